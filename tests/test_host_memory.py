"""host_memory: when the entrypoints re-execute with glibc's huge-page malloc, and that they do."""

import os
import subprocess
import sys

from dpo_jax import host_memory

GLIBC = ("glibc", "2.36")


def test_sets_the_tunable_on_a_recent_glibc_with_huge_pages():
    env = host_memory.hugepage_env({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.hugepage_env({}, GLIBC, "always")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_keeps_the_users_other_tunables():
    env = host_memory.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_leaves_the_process_alone_when_it_cannot_or_should_not():
    assert host_memory.hugepage_env({}, ("glibc", "2.34"), "madvise") is None  # tunable added in 2.35
    assert host_memory.hugepage_env({}, ("", ""), "madvise") is None  # musl, macOS
    assert host_memory.hugepage_env({}, GLIBC, "never") is None
    assert host_memory.hugepage_env({}, GLIBC, "") is None
    assert host_memory.hugepage_env({"DPO_JAX_HUGEPAGES": "0"}, GLIBC, "madvise") is None
    assert host_memory.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise") is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory._thp_mode(str(f)) == "madvise"
    assert host_memory._thp_mode(str(tmp_path / "missing")) == ""


def test_reexec_runs_the_same_command_once_with_the_tunable(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "print('start', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)\n"
        "from dpo_jax import host_memory\n"
        "host_memory.reexec_with_hugepages()\n"
        "print('after', os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DPO_JAX_HUGEPAGES")}
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    expected = host_memory.hugepage_env(env, host_memory.platform.libc_ver(), host_memory._thp_mode())
    if expected is None:  # this machine cannot: the process goes on as it is
        assert out[:2] == ["start  ['--flag=1']", "after "]
    else:  # re-executed once, same arguments
        assert out[:3] == ["start  ['--flag=1']", "start glibc.malloc.hugetlb=1 ['--flag=1']",
                           "after glibc.malloc.hugetlb=1"]
