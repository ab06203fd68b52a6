"""Entrypoint: python -m dpo_jax.main --config=configs/synthetic.py --workdir=/tmp/run [--config.key=value ...]"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/synthetic.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the final model and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    report = train.run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps({"workdir": _WORKDIR.value, **report}, indent=1, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
