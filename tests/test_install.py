"""Installation: the accelerator extras resolve, and nothing installs TensorFlow unless asked to.

Resolves against the package index (`pip install --dry-run`), as a user's
install would; nothing is installed.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def resolve(requirement: str, tmp_path) -> dict:
    """{name: version} of everything `pip install REQUIREMENT` would install into an empty environment."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--report", str(report), requirement],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }


@pytest.mark.slow
def test_accelerator_extras_resolve_and_bring_no_tensorflow(tmp_path):
    packages = resolve(".[cuda12,cuda13,tpu]", tmp_path)
    assert {"jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu"} <= set(packages)
    assert packages["jax-cuda12-plugin"] == packages["jax"] == packages["jax-cuda13-plugin"]
    assert not [name for name in packages if name in ("tensorflow", "tensorflow-cpu", "torch")]
