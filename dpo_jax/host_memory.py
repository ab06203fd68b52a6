"""Host memory for XLA:CPU: glibc malloc on transparent huge pages.

XLA:CPU mallocs an executable's temporary buffer on every call (about 350 MB for the CPU train step
of docs/performance.md). glibc serves an allocation that large with a fresh `mmap` and unmaps it
on free, so every step faults in about 85k new 4 KiB pages that the kernel zeroes one by one: about
15% of that step's wall time. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc
`madvise` its mappings for transparent huge pages (2 MiB): about 500x fewer faults, same results.

glibc reads GLIBC_TUNABLES once, at process start, so `reexec_with_hugepages()` re-executes the
current command with it set (once: the variable then marks the new process). The entrypoints
(`dpo_jax.main`, `dpo_jax.bench`) call it first; DPO_JAX_HUGEPAGES=0 turns it off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str:
    """The kernel's transparent-huge-page mode: the bracketed word of `path` ('' if unreadable)."""
    try:
        text = open(path, encoding="ascii").read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def hugepage_env(environ: Mapping[str, str], libc: tuple[str, str], thp_mode: str) -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done: not glibc >= 2.35,
    huge pages off in the kernel (mode 'never' or unknown), DPO_JAX_HUGEPAGES=0, or a
    glibc.malloc.hugetlb tunable already set (by us or by the user, who wins)."""
    name, version = libc
    if environ.get("DPO_JAX_HUGEPAGES", "1") == "0" or name != "glibc" or thp_mode not in ("always", "madvise"):
        return None
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepages() -> None:
    """Re-execute this process (same interpreter and command line, `sys.orig_argv`) with
    `glibc.malloc.hugetlb=1` when `hugepage_env` says so; otherwise return. Call it before any
    work: the process image is replaced."""
    if not sys.platform.startswith("linux"):
        return
    env = hugepage_env(os.environ, platform.libc_ver(), _thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
