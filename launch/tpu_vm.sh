#!/usr/bin/env bash
# Runs the main job on a Cloud TPU VM slice (single host or pod slice): every worker runs the same command and JAX
# finds the other workers from the VM's metadata (elastic_jax.train.distributed.initialize).
#
#   launch/tpu_vm.sh create   # create the slice
#   launch/tpu_vm.sh setup    # on all workers: mount the bucket, install the package
#   launch/tpu_vm.sh train    # on all workers: python -m elastic_jax.train (re-run to resume after a preemption)
#   launch/tpu_vm.sh logs     # last lines of each worker's log
#   launch/tpu_vm.sh delete   # delete the slice
#
# Settings (environment variables; see launch/README.md):
#   TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE (e.g. v5litepod-16: 4 hosts), RUNTIME_VERSION, SPOT=1 for spot VMs,
#   REPO_URL / REPO_REF (what to install), BUCKET (GCS bucket for the workdir, mounted at MOUNT on every worker),
#   CONFIG, RUN_NAME, TRAIN_ARGS (extra --config.key=value overrides).
set -euo pipefail

TPU_NAME="${TPU_NAME:-elastic-jax}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
SPOT="${SPOT:-0}"
REPO_URL="${REPO_URL:-https://github.com/OWNER/elastic_jax.git}"
REPO_REF="${REPO_REF:-main}"
BUCKET="${BUCKET:-}"
MOUNT="${MOUNT:-/mnt/elastic_jax}"
CONFIG="${CONFIG:-configs/tiny.py}"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG}" .py)}"
TRAIN_ARGS="${TRAIN_ARGS:-}"

require_bucket() {
  if [[ -z "${BUCKET}" ]]; then
    echo "set BUCKET to a GCS bucket name (no gs:// prefix): the workdir shared by all workers lives there" >&2
    exit 2
  fi
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" --worker=all \
    --command="$1"
}

create() {
  local spot_flag=()
  if [[ "${SPOT}" == "1" ]]; then
    spot_flag=(--spot)
  fi
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${spot_flag[@]}"
}

setup() {
  require_bucket
  # gcsfuse gives every worker the same workdir (checkpoints, phase outputs, report) in the bucket. Directory
  # renames must be allowed: Orbax finalizes a checkpoint by renaming its temporary directory.
  on_all_workers "set -euo pipefail
    if ! command -v gcsfuse >/dev/null; then
      echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 ${BUCKET} ${MOUNT}
    python3 -m venv ~/venv
    ~/venv/bin/pip install -q -U pip
    ~/venv/bin/pip install -q 'jax[tpu]'
    if [[ -d ~/elastic_jax ]]; then git -C ~/elastic_jax fetch -q origin ${REPO_REF} && git -C ~/elastic_jax checkout -q FETCH_HEAD;
    else git clone -q ${REPO_URL} ~/elastic_jax && git -C ~/elastic_jax checkout -q ${REPO_REF}; fi
    ~/venv/bin/pip install -q -e ~/elastic_jax"
}

train() {
  require_bucket
  # Same command on every worker; each writes its own log, process 0 writes the shared files. The job skips
  # finished phases and resumes the elastic phase from its last checkpoint, so re-running this resumes.
  on_all_workers "set -euo pipefail
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 ${BUCKET} ${MOUNT}
    cd ~/elastic_jax
    ~/venv/bin/python -m elastic_jax.train --config ${CONFIG} --workdir ${MOUNT}/${RUN_NAME} ${TRAIN_ARGS} \
      2>&1 | tee ~/train_${RUN_NAME}.log"
}

logs() {
  on_all_workers "tail -n 20 ~/train_${RUN_NAME}.log"
}

delete() {
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" --quiet
}

case "${1:-}" in
  create | setup | train | logs | delete) "$1" ;;
  *)
    echo "usage: $0 create|setup|train|logs|delete (settings via environment variables, see launch/README.md)" >&2
    exit 2
    ;;
esac
