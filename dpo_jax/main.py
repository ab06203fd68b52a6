"""Entrypoint: python -m dpo_jax.main --config=configs/synthetic.py --workdir=/tmp/run [--config.key=value ...]

Exit status: 0 finished; 75 (`multihost.PREEMPTED_EXIT`) preempted by SIGTERM after saving a
checkpoint (run the same command again to resume); anything else: failed (docs/launch.md).
"""

from dpo_jax import host_memory

if __name__ == "__main__":  # before the heavy imports: the process may be re-executed
    host_memory.reexec_with_malloc_tunables()

# pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import common  # noqa: E402
from dpo_jax import multihost, online, runner  # noqa: E402
from dpo_jax.train import preemption  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/synthetic.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the final model and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing, except that an unknown `--config.<key>` (ml_collections raises an
    AttributeError or KeyError) is one line naming it and the nearest valid key, exit status 2."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        path, keys = common.command_line_overrides(argv, _CONFIG.name)
        try:
            if path is not None:
                common.check_keys(flags.FLAGS[_CONFIG.name].parser.parse(path), keys, _CONFIG.name)
        except ValueError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(2)
        raise


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        run = online.run if config.get("online") is not None and config.online.rounds > 0 else runner.run
        report = run(config, _WORKDIR.value)
    except preemption.Preempted as e:  # a documented status: a scheduler requeues, a re-run resumes
        logging.warning("%s (exit status %d)", e, multihost.PREEMPTED_EXIT)
        sys.exit(multihost.PREEMPTED_EXIT)
    if multihost.is_main_process():
        print(summary(report, _WORKDIR.value))


SUMMARY_KEYS = ("eval/loss", "eval/accuracy", "eval/rewards/margins", "sample/reward", "sample/reward_ref",
                "sample/kl", "sample/win_rate", "sample/malformed_frac", "optimum/reward", "optimum/kl",
                "frontier/reward_at_kl", "frontier/regret", "frontier/regret_frac", "projected/reward", "projected/kl",
                "projected/regret_frac")


def summary(report: dict, workdir: str) -> str:
    """A few lines: where the run is, and its headline numbers (the rest is in report.json)."""
    lines = [f"dpo_jax: {report.get('loss')} for {report.get('steps')} steps -> {workdir}"]
    lines += [f"  {k:24s} {report[k]:.4f}" for k in SUMMARY_KEYS if isinstance(report.get(k), float)]
    lines.append(f"  report: {workdir}/report.json   metrics: {workdir}/metrics.jsonl")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
