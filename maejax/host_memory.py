"""Large host buffers on transparent huge pages, for the programs maejax starts.

XLA CPU allocates each step's scratch buffer afresh (1.4 GB for a ViT-B/16
MAE step at batch 8). glibc serves an allocation that large with mmap and
gives it back with munmap, so every step faults in its pages again, 4 KiB at
a time: about 306,000 minor page faults per step, 0.3 s of a 2.8 s step on
a 2-core CPU. glibc's `glibc.malloc.hugetlb=1` tunable has malloc advise
transparent huge pages for such mappings, which leaves about 1,200 faults.

glibc reads its tunables only when a process starts, so
`reexec_with_huge_pages` starts the same program again (os.execve: same pid,
arguments and environment) with the tunable added. It does nothing where it
cannot help: the kernel's transparent huge pages set to 'always' (every
large mapping has them already) or 'never', a glibc older than 2.35 (no such
tunable), the tunable already set, or MAEJAX_HUGE_PAGES=0 in the environment.
"""

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "MAEJAX_HUGE_PAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple | None:
    """(major, minor) of the C library this process runs on, or None when it is not glibc."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None if unknown."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def huge_pages_environment(environ, libc: tuple | None, mode: str | None) -> dict | None:
    """The environment to start again with, or None when starting again would change nothing."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or mode != "madvise" or libc is None or libc < MIN_GLIBC:
        return None
    if TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def reexec_with_huge_pages() -> None:
    """Start this program again with glibc's huge-page tunable, where that helps; else return.

    Call it first thing in a `__main__` block: whatever ran before is run again.
    """
    environment = huge_pages_environment(os.environ, glibc_version(), thp_mode())
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)


def describe() -> str:
    """One line for logs and benchmarks: whether this process runs with the tunable."""
    tunable = f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "")
    return f"host memory: {TUNABLE} {'on' if tunable else 'off'}, transparent huge pages {thp_mode()}"
