"""The Colab notebook runs, every cell but the install cell, on CPU with tiny settings."""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO, tiny_overrides

NOTEBOOK = os.path.join(REPO, "notebooks", "maejax_demo.ipynb")
TINY_MODEL = {k: v for k, v in tiny_overrides("").items() if k.startswith("model.")}


def tagged(cell, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


def test_the_notebook_is_committed_without_outputs_and_the_badge_points_at_it():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum(tagged(c, "parameters") for c in code) == 1 and sum(tagged(c, "install") for c in code) == 1
    install = next(c.source for c in code if tagged(c, "install"))
    repository = re.search(r'MAEJAX_REPOSITORY = "(https://github.com/([^"]+))"', install)
    badge = f"https://colab.research.google.com/github/{repository.group(2)}/blob/main/notebooks/maejax_demo.ipynb"
    with open(os.path.join(REPO, "README.md")) as f:
        assert badge in f.read()
    assert badge in notebook.cells[0].source


@pytest.mark.slow
def test_the_notebook_executes_on_cpu_with_tiny_settings(tmp_path, tfds_dir, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [c for c in notebook.cells if not tagged(c, "install")]
    parameters = next(i for i, c in enumerate(notebook.cells) if tagged(c, "parameters"))
    tiny = {
        "PRETRAIN_STEPS": 8,
        "DIFFMAE_STEPS": 8,
        "BATCH_SIZE": 32,
        "SAMPLE_IMAGES": 4,
        "SAMPLE_STEPS": 4,
        "MODEL_OVERRIDES": TINY_MODEL,
        "DATA_DIR": tfds_dir,
        "WORKDIR": str(tmp_path / "workdirs"),
        "OFFICIAL_WEIGHTS_URL": "http://127.0.0.1:9/mae_visualize_vit_large.pth",  # offline: skipped
    }
    source = "\n".join(f"{name} = {json.dumps(value)}" for name, value in tiny.items())
    notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(source.replace("null", "None")))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # the MAE curve and grid, the inpainting grid
    text = "".join(o.get("text", "") for o in outputs)
    assert "skipping the official weights" in text and "psnr_tT" in text
    assert os.path.exists(tmp_path / "workdirs" / "diffmae" / "sample_metrics.json")
