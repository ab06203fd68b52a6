"""Host memory for XLA:CPU: glibc malloc on transparent huge pages, and optionally a heap that keeps its pages.

XLA:CPU mallocs an executable's temporary buffer on every call (about 350 MB for the CPU train step
of docs/performance.md). By default glibc serves an allocation that large with a fresh `mmap` (or,
from a thread's own arena, a fresh mapping too) and unmaps it on free, so every step faults in new
pages that the kernel zeroes: 85,800 faults per step with 4 KiB pages. Two sets of glibc tunables
(`GLIBC_TUNABLES`, read once at process start):

- `HUGE_PAGES`, always: `hugetlb=1` (glibc >= 2.35, with the kernel's transparent huge pages on)
  makes malloc `madvise` its memory for 2 MiB pages: about 500x fewer faults, same results.
- `KEEP_HEAP`, where asked for: `mmap_max=0` (large blocks come from the heap, not from their own
  mappings), `arena_max=1` (every thread allocates from that one heap; a thread arena's heaps are
  at most 64 MB and would map larger blocks anyway) and a `trim_threshold` no heap reaches (freed
  memory is never returned). The next step reuses the same pages: 0 faults per step, the CPU
  benchmark's step 1.05-1.10x faster. But every thread then shares one arena's lock: the synthetic
  default run (`configs/synthetic.py`, steps of a few ms) took 51-55 s instead of 42-44 s. So the
  benchmarks keep the heap by default, the trainer only when asked (DPO_JAX_KEEP_HEAP=1; its CPU
  steps of a tenth of a second and more gain, docs/performance.md).

`reexec_with_malloc_tunables(keep_heap)` re-executes the current command with the tunables the
environment lacks (once: they then mark the new process); DPO_JAX_KEEP_HEAP=1 or 0 overrides
`keep_heap`, DPO_JAX_MALLOC_TUNABLES=0 turns all of it off, and a tunable the user already set is
left as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

KEEP_HEAP = {"glibc.malloc.mmap_max": "0", "glibc.malloc.arena_max": "1",
             "glibc.malloc.trim_threshold": str(1 << 40)}
HUGE_PAGES = {"glibc.malloc.hugetlb": "1"}
OFF_SWITCH = "DPO_JAX_MALLOC_TUNABLES"
KEEP_HEAP_SWITCH = "DPO_JAX_KEEP_HEAP"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str:
    """The kernel's transparent-huge-page mode: the bracketed word of `path` ('' if unreadable)."""
    try:
        text = open(path, encoding="ascii").read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def _glibc_version(libc: tuple[str, str]) -> Optional[tuple[int, int]]:
    name, version = libc
    try:
        return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None
    except ValueError:
        return None


def malloc_env(environ: Mapping[str, str], libc: tuple[str, str], thp_mode: str, keep_heap: bool) -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done: not glibc >= 2.26
    (tunables), DPO_JAX_MALLOC_TUNABLES=0, or every wanted tunable already set. `HUGE_PAGES` on
    glibc >= 2.35 with huge pages on in the kernel ('always' or 'madvise'); `KEEP_HEAP` when
    `keep_heap` (DPO_JAX_KEEP_HEAP=1 / 0 in `environ` overrides it); a tunable whose name
    `GLIBC_TUNABLES` already holds is the user's and stays."""
    version = _glibc_version(libc)
    if environ.get(OFF_SWITCH, "1") == "0" or version is None or version < (2, 26):
        return None
    keep_heap = {"1": True, "0": False}.get(environ.get(KEEP_HEAP_SWITCH, ""), keep_heap)
    wanted = dict(KEEP_HEAP) if keep_heap else {}
    if version >= (2, 35) and thp_mode in ("always", "madvise"):
        wanted.update(HUGE_PAGES)
    tunables = environ.get("GLIBC_TUNABLES", "")
    present = {item.partition("=")[0] for item in tunables.split(":") if item}
    added = [f"{name}={value}" for name, value in wanted.items() if name not in present]
    if not added:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + added)
    return env


def reexec_with_malloc_tunables(keep_heap: bool = False) -> None:
    """Re-execute this process (same interpreter and command line, `sys.orig_argv`) with the
    tunables of `malloc_env` when it says so; otherwise return. Call it before any work: the
    process image is replaced. The benchmarks pass keep_heap=True, the trainer the default."""
    if not sys.platform.startswith("linux"):
        return
    env = malloc_env(os.environ, platform.libc_ver(), _thp_mode(), keep_heap)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
