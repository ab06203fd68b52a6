"""`python -m signal_at_step ARGS` (with this directory on PYTHONPATH): `python -m dpo_jax.main ARGS`
that sends itself TEST_SIGNAL during its TEST_SIGNAL_AT_CALL-th training step, in the process whose
JAX_PROCESS_ID is TEST_SIGNAL_PROCESS (default 0), once the path TEST_SIGNAL_AFTER_PATH (if given:
e.g. a checkpoint being written) exists, then sleeps TEST_SIGNAL_THEN_SLEEP_S (default 0: e.g. for
JAX's preemption notifier, which looks for a SIGTERM once a second, to see it before the run
ends). `metrics.step_flops` runs once per training step (SFT steps
included), before the step: deterministic however fast the machine is."""

import os
import runpy
import sys
import time

from dpo_jax.train import metrics

SIGNUM, AT_CALL = int(os.environ["TEST_SIGNAL"]), int(os.environ["TEST_SIGNAL_AT_CALL"])
ME = os.environ.get("JAX_PROCESS_ID", "0") == os.environ.get("TEST_SIGNAL_PROCESS", "0")
_calls, _step_flops = [0], metrics.step_flops


def _wrapped(*args, **kwargs):
    _calls[0] += 1
    if ME and _calls[0] == AT_CALL:
        deadline = time.monotonic() + 120
        while os.environ.get("TEST_SIGNAL_AFTER_PATH") and not os.path.exists(os.environ["TEST_SIGNAL_AFTER_PATH"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{os.environ['TEST_SIGNAL_AFTER_PATH']} did not appear")
            time.sleep(0.05)
        os.kill(os.getpid(), SIGNUM)
        time.sleep(float(os.environ.get("TEST_SIGNAL_THEN_SLEEP_S", "0")))
    return _step_flops(*args, **kwargs)


metrics.step_flops = _wrapped
sys.argv = ["dpo_jax.main", *sys.argv[1:]]
runpy.run_module("dpo_jax.main", run_name="__main__", alter_sys=True)
