#!/usr/bin/env bash
# launch/train.sh RECIPE DATA [--out DIR] [--resume auto] [section.key=value ...]
# Train on this machine with the right accelerate config, printing the command it runs:
#   >1 GPU: launch/gpus.yaml, one process per GPU          1 GPU: launch/gpu1.yaml
#   no GPU: launch/cpu.yaml with ACCELERATE_USE_CPU=1, $SHARDTRAIN_NPROC processes (default 2)
# Environment: SHARDTRAIN_PYTHON (python with shardtrain+accelerate; default: python on PATH),
# SHARDTRAIN_NPROC, SHARDTRAIN_PORT (rendezvous port, default 29500: set it for concurrent runs).
set -euo pipefail
if [ $# -lt 2 ] || [[ $1 == -* ]]; then
  echo "usage: launch/train.sh RECIPE DATA [--out DIR] [section.key=value ...]" >&2; exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
recipe=$1 data=$2; shift 2
PYTHON=${SHARDTRAIN_PYTHON:-$(command -v python || command -v python3)}

gpus=0
if command -v nvidia-smi >/dev/null; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "$gpus" = 0 ]; then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi

# `accelerate launch` through shardtrain.launch: a failed run ends with the trainer's own line and
# exit code instead of torch elastic's ChildFailedError traceback and exit 1
launch=("$PYTHON" -m shardtrain.launch accelerate)
if [ "$gpus" -gt 1 ]; then
  launch+=(--config_file "$here/gpus.yaml" --num_processes "$gpus")
elif [ "$gpus" = 1 ]; then
  launch+=(--config_file "$here/gpu1.yaml")
else
  # a YAML cannot make `accelerate launch` start N CPU processes; this variable can (cpu.yaml)
  export ACCELERATE_USE_CPU=1
  launch+=(--config_file "$here/cpu.yaml" --num_processes "${SHARDTRAIN_NPROC:-2}")
fi
[ -n "${SHARDTRAIN_PORT:-}" ] && launch+=(--main_process_port "$SHARDTRAIN_PORT")
cmd=("${launch[@]}" -m shardtrain train --recipe "$recipe" --data "$data" "$@")

echo "+ ${ACCELERATE_USE_CPU:+ACCELERATE_USE_CPU=1 }${cmd[*]}" >&2
exec "${cmd[@]}"
