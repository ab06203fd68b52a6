#!/bin/bash
# One dpo_jax run on every worker of a Cloud TPU VM pod (or a single TPU VM).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=configs/synthetic.py --workdir=/mnt/shared/run1 [--config.key=value ...]
#
# Runs `cd REPO_DIR && PYTHON -m dpo_jax.main ARGS` on all workers at once through
# `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed initializes itself from the TPU
# environment (dpo_jax.sharding.maybe_initialize_distributed), each worker feeds its own shard of
# the batch, process 0 writes metrics, report and exports. The workdir must be a directory every
# worker sees (NFS / Filestore / gcsfuse mount) so that checkpoints and the shared SFT model agree.
#
# Environment: TPU_NAME, ZONE (required); PROJECT (gcloud --project); REPO_DIR (the checkout on the
# workers, default ~/dpo_jax); PYTHON (default python3); DRY_RUN=1 prints the command instead.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: TPU_NAME=NAME ZONE=ZONE $0 --config=FILE[:ARG] --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod) name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
REPO_DIR=${REPO_DIR:-"~/dpo_jax"}  # expanded on the workers
PYTHON=${PYTHON:-python3}

# A word as the shell reads it back: as is when plain, else in single quotes.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}

# The remote command: every argument quoted for the remote shell.
remote="cd ${REPO_DIR} && ${PYTHON} -m dpo_jax.main"
for arg in "$@"; do
  remote+=" $(q "$arg")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote")
if [[ -n ${PROJECT:-} ]]; then
  cmd+=(--project "$PROJECT")
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  line=""
  for word in "${cmd[@]}"; do
    line+="$(q "$word") "
  done
  echo "${line% }"
else
  exec "${cmd[@]}"
fi
