"""Imported first in a subprocess: makes TensorFlow absent, as on a machine that never installed it.

`import tensorflow` then fails and `importlib.util.find_spec("tensorflow")`
returns None (what libraries check), although the package is in this
virtualenv (the test suite needs it to build the Fashion-MNIST dataset).
At exit, prints which tensorflow modules were imported (there must be none).
MAEJAX_TEST_ABSENT=pkg1,pkg2 makes more packages absent the same way (gcsfs:
a machine without the gs:// backend).
"""

import atexit
import importlib.machinery
import os
import sys

ABSENT = {"tensorflow", *filter(None, os.environ.get("MAEJAX_TEST_ABSENT", "").split(","))}


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [
    _PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
]


@atexit.register
def _report():
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
    print(f"TENSORFLOW_MODULES={imported}", file=sys.stderr, flush=True)
