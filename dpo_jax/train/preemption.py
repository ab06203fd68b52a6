"""Preemption: when a run must save and stop.

``install_sigterm_handler`` gives a ``PreemptionFlag`` whose ``reached()``, asked by
the loop at every step boundary, says when to save and stop. One process: a SIGTERM (and SIGINT)
sets it. Several processes must all save the SAME step: after ``jax.distributed.initialize()``
JAX's coordination service owns SIGTERM (a C handler that a Python one would replace, breaking
it), a notice on any process reaches all of them, and
``multihost_utils.reached_preemption_sync_point(n)`` (orbax's ``reached_preemption``), called by
every process at every boundary with an increasing n, is True on all of them at the same n, about
a second after the signal. A preempted run then exits with ``multihost.PREEMPTED_EXIT``.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
    """Training stopped after saving a checkpoint because of a preemption notice (SIGTERM)."""


class PreemptionFlag:
    """``requested`` turns True when one of ``signals`` arrives (``signum`` says which); a second
    SIGINT raises KeyboardInterrupt. ``uninstall()`` puts the previous handlers back. With
    ``coordinated`` (several processes under ``jax.distributed``) SIGTERM is left to JAX's
    preemption service and ``reached()`` asks its sync point."""

    def __init__(self, signals=(signal.SIGTERM,), coordinated: bool = False):
        self.requested = False
        self.signum: int | None = None
        self.coordinated = coordinated
        self._boundaries = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("install_sigterm_handler must be called from the main thread")
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def reached(self) -> bool:
        """Whether to save and stop at this step boundary; call it at every boundary, on every
        process (with several processes it is a sync point, True everywhere at the same call)."""
        self._boundaries += 1
        if self.coordinated:
            return bool(multihost_utils.reached_preemption_sync_point(self._boundaries)) or self.requested
        return self.requested

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_sigterm_handler(*, sigint: bool = False) -> PreemptionFlag:
    """A ``PreemptionFlag`` set by SIGTERM (and SIGINT if ``sigint``); under ``jax.distributed``
    one that asks JAX's preemption sync point and leaves SIGTERM to JAX (module docstring)."""
    coordinated = jax.distributed.is_initialized() and jax.process_count() > 1
    signals = (signal.SIGINT,) if sigint else ()
    if not coordinated:
        signals = (signal.SIGTERM,) + signals
    return PreemptionFlag(signals, coordinated=coordinated)
