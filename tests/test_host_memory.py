"""host_memory: which glibc tunables the entrypoints re-execute with, that they do, and that with
the kept heap a freed block is reused without fresh page faults."""

import os
import subprocess
import sys

import pytest

from dpo_jax import host_memory

GLIBC = ("glibc", "2.36")
KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=1099511627776"
HUGE = "glibc.malloc.hugetlb=1"
ALL = KEEP + ":" + HUGE


def test_huge_pages_always_and_the_kept_heap_where_asked_for():
    env = host_memory.malloc_env({"PATH": "/bin"}, GLIBC, "madvise", keep_heap=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": ALL}
    assert host_memory.malloc_env({}, GLIBC, "always", keep_heap=True)["GLIBC_TUNABLES"] == ALL
    assert host_memory.malloc_env({}, GLIBC, "madvise", keep_heap=False)["GLIBC_TUNABLES"] == HUGE


def test_the_environment_switch_overrides_the_entrypoints_choice():
    on, off = {"DPO_JAX_KEEP_HEAP": "1"}, {"DPO_JAX_KEEP_HEAP": "0"}
    assert host_memory.malloc_env(on, GLIBC, "madvise", keep_heap=False)["GLIBC_TUNABLES"] == ALL
    assert host_memory.malloc_env(off, GLIBC, "madvise", keep_heap=True)["GLIBC_TUNABLES"] == HUGE


def test_keeps_the_heap_without_huge_pages_where_the_kernel_or_glibc_has_none():
    assert host_memory.malloc_env({}, GLIBC, "never", keep_heap=True)["GLIBC_TUNABLES"] == KEEP
    assert host_memory.malloc_env({}, GLIBC, "", keep_heap=True)["GLIBC_TUNABLES"] == KEEP
    assert host_memory.malloc_env({}, ("glibc", "2.34"), "madvise", keep_heap=True)["GLIBC_TUNABLES"] == KEEP
    assert host_memory.malloc_env({}, GLIBC, "never", keep_heap=False) is None  # nothing to add


def test_the_users_tunables_stay_and_win():
    env = host_memory.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.x86_ibt=on"}, GLIBC,
                                 "madvise", keep_heap=True)
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:glibc.cpu.x86_ibt=on:glibc.malloc.mmap_max=0:"
                                     "glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1")
    assert host_memory.malloc_env({"GLIBC_TUNABLES": ALL}, GLIBC, "madvise", keep_heap=True) is None
    assert host_memory.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise",
                                  keep_heap=False) is None


def test_leaves_the_process_alone_when_it_cannot_or_should_not():
    for keep in (True, False):
        assert host_memory.malloc_env({}, ("glibc", "2.25"), "madvise", keep) is None  # tunables came in 2.26
        assert host_memory.malloc_env({}, ("", ""), "madvise", keep) is None  # musl, macOS
        assert host_memory.malloc_env({}, ("glibc", "x"), "madvise", keep) is None
        assert host_memory.malloc_env({"DPO_JAX_MALLOC_TUNABLES": "0"}, GLIBC, "madvise", keep) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory._thp_mode(str(f)) == "madvise"
    assert host_memory._thp_mode(str(tmp_path / "missing")) == ""


def _clean_env():
    return {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", host_memory.OFF_SWITCH, host_memory.KEEP_HEAP_SWITCH)}


@pytest.mark.parametrize("keep_heap", [True, False])
def test_reexec_runs_the_same_command_once_with_the_tunables(tmp_path, keep_heap):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "print('start', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)\n"
        "from dpo_jax import host_memory\n"
        f"host_memory.reexec_with_malloc_tunables(keep_heap={keep_heap})\n"
        "print('after', os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n")
    env = _clean_env()
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    expected = host_memory.malloc_env(env, host_memory.platform.libc_ver(), host_memory._thp_mode(), keep_heap)
    if expected is None:  # this machine cannot: the process goes on as it is
        assert out[:2] == ["start  ['--flag=1']", "after "]
    else:  # re-executed once, same arguments
        tunables = expected["GLIBC_TUNABLES"]
        assert out[:3] == ["start  ['--flag=1']", f"start {tunables} ['--flag=1']", f"after {tunables}"]


# A thread mallocs 64 MiB, writes every byte, frees it; three times. Prints the page faults of each write.
_FAULT_PROBE = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
def work():
    for _ in range(3):
        p = libc.malloc(64 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(p, 1, 64 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(p)
t = threading.Thread(target=work)
t.start()
t.join()
print(*faults)
"""


def _write_faults(env) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _FAULT_PROBE], env=env, capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


def test_with_the_tunables_a_freed_block_is_reused_without_page_faults():
    """XLA:CPU's temporary buffer, in small: from a worker thread, without the tunables every
    malloc of a large block is a fresh mapping faulted in again (at least one fault per 2 MiB
    even on huge pages); with them the second and third writes fault nothing."""
    env = _clean_env()
    tuned = host_memory.malloc_env(env, host_memory.platform.libc_ver(), host_memory._thp_mode(), keep_heap=True)
    if tuned is None:
        pytest.skip("this machine's libc takes no malloc tunables")
    plain = _write_faults(env)
    assert min(plain[1:]) >= 32, plain  # 64 MiB / 2 MiB
    kept = _write_faults(tuned)
    assert max(kept[1:]) < 16, kept
