#!/bin/bash
# Train on one node (8 GPUs by default) and survive time limits and preemption.
#
#   sbatch launch/slurm_single_node.sh --arch densenet169 --data /datasets/imagenet --output-dir runs/d169
#   sbatch --gpus-per-node=4 --cpus-per-task=32 launch/slurm_single_node.sh --arch densenet121 ...
#   sbatch --gpus-per-node=0 --cpus-per-task=8 launch/slurm_single_node.sh --data demo --arch densenet_tiny --image-size 32
#
# Everything after the script name goes to train_dist.py. Cluster specifics: the block below
# (or the same options on the sbatch command line) and launch/site.sh. About a few minutes
# before the time limit SLURM sends SIGUSR1; the training checkpoints, this job requeues itself
# and the next start resumes from that checkpoint (docs/launch.md).
#
#SBATCH --job-name=densenet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_account
##SBATCH --mem=0
##SBATCH --exclusive
set -euo pipefail

# SLURM runs a copy of this script from its spool directory; the submitted path says where
# the rest of launch/ is.
if [[ -z "${LAUNCH_DIR:-}" ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
        LAUNCH_DIR=$(dirname "$submitted")
    else
        LAUNCH_DIR=$(dirname "${BASH_SOURCE[0]}")
    fi
fi
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh" ||
    { echo "cannot read $LAUNCH_DIR/lib.sh: set LAUNCH_DIR to the launch/ folder" >&2; exit 2; }

require_slurm_job
load_site
launch_log "job $SLURM_JOB_ID on $(hostname -s): SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"

# SIGUSR1 (--signal=B:USR1@...) reaches this shell only; the node agent passes it on.
warned=0
agent=
on_warning() {
    warned=1
    launch_log "SIGUSR1: the job ends soon (time limit or preemption); asking the training to checkpoint and stop"
    if [[ -n "$agent" ]]; then kill -USR1 "$agent" 2>/dev/null || true; fi
}
trap on_warning USR1
trap on_slurm_term TERM

# The job runs in the background and the shell waits: bash runs a trap only between commands.
"$LAUNCH_DIR/node_agent.sh" --standalone --nnodes=1 \
    "$TRAIN_SCRIPT" "$@" &
agent=$!
wait_until_exit "$agent"
finish_or_requeue "$EXIT_STATUS" "$warned"
