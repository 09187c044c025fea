#!/usr/bin/env bash
# Several nodes under SLURM: sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm.sh [hnmix.train options]
# One `accelerate launch` per node; Accelerate starts one process per GPU and joins the nodes.
#SBATCH --job-name=hnmix
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:TERM@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch --config_file accelerate_config.yaml --multi_gpu \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port ${MAIN_PORT:-29500} \
  -m hnmix.train --dataset ilee0022/Caltech-256 --dir_out runs/caltech256 --resume auto $*"
