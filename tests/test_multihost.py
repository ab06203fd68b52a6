"""multihost: environment detection, initialization arguments, one-process collectives, log labels.
The collectives across real processes are exercised by tests/launch/test_multiprocess.py."""

import logging

import jax
import numpy as np
import pytest

from dpo_jax import multihost

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
            "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(multihost, "label_logs", lambda: None)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    return calls


def test_single_process_environments_do_not_initialize(clean_env, monkeypatch):
    assert multihost.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert multihost.maybe_initialize_distributed() is False
    assert clean_env == []


def test_slurm_tasks_initialize_with_the_configured_timeouts(clean_env, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert multihost.maybe_initialize_distributed(heartbeat_timeout_s=7, initialization_timeout_s=9) is True
    assert clean_env == [{"heartbeat_timeout_seconds": 7, "initialization_timeout": 9}]


def test_the_local_launchers_variables_are_passed_on(clean_env, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert multihost.maybe_initialize_distributed()
    assert clean_env[0]["num_processes"] == 2 and clean_env[0]["process_id"] == 1
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        multihost.maybe_initialize_distributed()


def test_one_process_collectives_are_identities():
    np.testing.assert_array_equal(multihost.agree_max([3, -1, 7]), [3, -1, 7])
    rows = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(multihost.allgather_rows(rows), rows)
    multihost.barrier("test")
    assert multihost.is_main_process()
    tree = {"a": jax.numpy.ones((2, 3)), "b": np.int32(4)}
    host = multihost.fetch_to_host(tree)
    assert isinstance(host["a"], np.ndarray) and host["a"].shape == (2, 3) and int(host["b"]) == 4


@pytest.mark.parametrize("n,count", [(10, 3), (2, 4), (8, 2)])
def test_process_shares_are_contiguous_and_cover_everything(n, count):
    shares = [multihost.process_share(n, i, count) for i in range(count)]
    covered = [i for s in shares for i in range(n)[s]]
    assert covered == list(range(n))
    assert max(len(range(n)[s]) for s in shares) - min(len(range(n)[s]) for s in shares) <= 1


def test_log_label_prefixes_each_record_once():
    label = multihost._ProcessLabel("[process 1/2]")  # pylint: disable=protected-access
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "resumed from step %d", (5,), None)
    assert label.filter(record) and label.filter(record)
    assert record.getMessage() == "[process 1/2] resumed from step 5"


def test_allgather_json_of_one_process_is_a_list_of_one():
    assert multihost.allgather_json({"next_index": 3}) == [{"next_index": 3}]
