"""maejax/host_memory.py: when maejax starts itself again with glibc's huge-page tunable, and that it does."""

import os
import subprocess
import sys

import pytest

from maejax import host_memory
from tests.conftest import REPO

GLIBC = (2, 36)


@pytest.mark.parametrize(
    "environ, libc, mode, expected",
    [
        ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            GLIBC,
            "madvise",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's choice stands
        ({"MAEJAX_HUGE_PAGES": "0"}, GLIBC, "madvise", None),
        ({}, GLIBC, "always", None),  # large mappings have huge pages already
        ({}, GLIBC, "never", None),
        ({}, GLIBC, None, None),  # no /sys (not Linux, or a sandbox)
        ({}, (2, 31), "madvise", None),  # no such tunable before glibc 2.35
        ({}, None, "madvise", None),  # musl, macOS
    ],
)
def test_it_starts_again_only_where_the_tunable_helps(environ, libc, mode, expected):
    environment = host_memory.huge_pages_environment({"PATH": "/bin", **environ}, libc, mode)
    if expected is None:
        assert environment is None
    else:
        assert environment == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": expected}


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(tmp_path / "enabled")) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(
    not (host_memory.glibc_version() or (0,)) >= host_memory.MIN_GLIBC, reason="needs glibc >= 2.35"
)
def test_the_program_starts_again_with_its_arguments_and_the_tunable_once():
    script = (
        "import os, sys\n"
        "from maejax import host_memory\n"
        "host_memory.thp_mode = lambda path=None: 'madvise'\n"
        "print('start', flush=True)\n"
        "host_memory.reexec_with_huge_pages()\n"
        "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:], host_memory.describe().split(',')[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MAEJAX_HUGE_PAGES")}
    result = subprocess.run(
        [sys.executable, "-c", script, "a", "--b=c"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "start",
        "start",
        "glibc.malloc.hugetlb=1 ['a', '--b=c'] host memory: glibc.malloc.hugetlb on",
    ]
