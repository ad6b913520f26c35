"""experiments/knn_pool.py and experiments/denoiser_profile.py on real data."""

import json
import os

import pytest

from experiments import knn_pool


@pytest.mark.slow
def test_knn_pool_reproduces_the_monitor_and_chooses_the_pool_on_validation(tmp_path, pretrained_workdir):
    # The shared workdir's kNN monitor: cls features, the first 1,000 training / 500 test images.
    knn_pool.main(
        [f"--encoder={pretrained_workdir}", f"--out={tmp_path}", "--bank=800"]
        + ["--num_train=1000", "--num_eval=500"]
    )
    with open(tmp_path / "knn_pool.json") as f:
        result = json.load(f)["encoders"][pretrained_workdir]
    with open(os.path.join(pretrained_workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if "knn_top1" in line]
    assert logged[-1]["step"] == 100 and result["checkpoint"].endswith("step 100")
    # The same feature, bank and queries as maejax's monitor: the same accuracy, up to one query.
    assert result["test"]["cls"] == pytest.approx(logged[-1]["knn_top1"], abs=1 / 500 + 1e-9)
    assert result["chosen"] == max(result["validation"], key=result["validation"].get)
    assert all(0.1 < v <= 1.0 for split in ("validation", "test") for v in result[split].values())
    assert f"{100 * result['test'][result['chosen']]:.2f}*" in (tmp_path / "knn_pool.md").read_text()
