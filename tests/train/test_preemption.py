"""The preemption flag: SIGTERM/SIGINT handling and the step-boundary protocol of one process (several
processes: tests/launch/test_multiprocess.py)."""

import os
import signal

import pytest

from dpo_jax.train.preemption import install_sigterm_handler


def test_sigterm_sets_flag_and_uninstall_restores():
    before = signal.getsignal(signal.SIGTERM)
    flag = install_sigterm_handler()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before

    before_int = signal.getsignal(signal.SIGINT)
    with install_sigterm_handler(sigint=True) as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C really interrupts
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is before_int


def test_one_process_stops_at_the_first_boundary_after_sigterm():
    with install_sigterm_handler() as flag:
        assert not flag.coordinated  # no jax.distributed: SIGTERM is ours
        assert [flag.reached() for _ in range(3)] == [False] * 3
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.reached() and flag.reached()
