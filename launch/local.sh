#!/bin/bash
# Train on this workstation with torchrun, one process per GPU.
#
#   launch/local.sh --arch densenet121 --data /datasets/imagenet --output-dir runs/d121
#   NGPU=2 launch/local.sh --arch densenet121 --data /datasets/imagenet --output-dir runs/d121
#   NGPU=0 NPROC=2 launch/local.sh --data demo --arch densenet_tiny --image-size 32   # CPU, gloo
#   MAX_RESTARTS=3 launch/local.sh ...   # restart all processes (from the checkpoint) if one dies
#
# Everything after the script name goes to train_dist.py. NGPU defaults to the GPUs
# CUDA_VISIBLE_DEVICES lists when it is set, else to every GPU nvidia-smi lists; with none,
# NPROC CPU processes (default 1) train with gloo. Ctrl-C makes the training checkpoint and
# stop (torchrun passes SIGINT on and kills the workers 30 s later); the same command resumes
# from the checkpoint in --output-dir.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"
load_site

NGPU=${NGPU:-$(visible_gpus)}
[[ "$NGPU" =~ ^[0-9]+$ ]] || die "NGPU=$NGPU is not a number of GPUs"
if ((NGPU > 0)); then
    procs=$NGPU
else
    procs=${NPROC:-1}
    is_positive_int "$procs" || die "NPROC=$procs is not a positive number of processes"
    export CUDA_VISIBLE_DEVICES=""  # NGPU=0 means the CPU even where GPUs exist
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cpus=$(nproc)
    OMP_NUM_THREADS=$((cpus / procs > 0 ? cpus / procs : 1))
    export OMP_NUM_THREADS
fi
max_restarts=${MAX_RESTARTS:-0}
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$max_restarts is not a number of restarts"
isolate_restart_stores "$max_restarts"
launch_log "$procs training processes ($NGPU GPUs, OMP_NUM_THREADS=$OMP_NUM_THREADS)"

# MAX_RESTARTS > 0: when a process dies, torchrun restarts them all and they resume from the
# last checkpoint.
exec torchrun --standalone --nproc_per_node="$procs" --max-restarts="$max_restarts" "$TRAIN_SCRIPT" "$@"
