#!/usr/bin/env bash
# Several nodes under SLURM: sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm.sh [hnmix.train options]
# One `accelerate launch` per node; Accelerate starts one process per GPU and joins the nodes.
# --signal=TERM@120 (no `B:`) sends SIGTERM to the job step's processes, the trainers included,
# 120 s before the time limit; they save, and the job is requeued (--requeue) to go on with
# --resume auto. A preempted job gets the same SIGTERM from SLURM. DIR_OUT: where the run goes.
#SBATCH --job-name=hnmix
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}  # within the 120 s of notice
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
DIR_OUT=${DIR_OUT:-runs/caltech256}
# Bad options: one line and exit 2 here, before any node starts (hnmix/train/preflight.py).
python -m hnmix.train.preflight --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --config configs/mochi_caltech256.yaml --dir_out "$DIR_OUT" --resume auto "$@" || exit $?
status=0
srun bash -c "accelerate launch --config_file accelerate_config.yaml --multi_gpu \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port ${MAIN_PORT:-29500} \
  -m hnmix.train --config configs/mochi_caltech256.yaml --dir_out $DIR_OUT --resume auto $*" || status=$?
if [ -f "$DIR_OUT/STOPPED" ]; then
  cat "$DIR_OUT/STOPPED" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 75
fi
exit "$status"
