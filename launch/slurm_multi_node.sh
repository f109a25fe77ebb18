#!/bin/bash
# Train on N nodes x 8 GPUs and survive time limits and preemption.
#
#   sbatch --nodes=4 launch/slurm_multi_node.sh --arch densenet201 --data /datasets/imagenet --output-dir runs/d201
#
# srun starts one torchrun agent per node; the agents meet in a c10d rendezvous on the first
# node of the allocation, on a port derived from the job id (RDZV_PORT overrides it). Everything
# after the script name goes to train_dist.py. Cluster specifics: the block below (or the same
# options on the sbatch command line) and launch/site.sh. Preemption and resume: docs/launch.md.
#
#SBATCH --job-name=densenet
#SBATCH --nodes=2
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

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
rdzv_host=${hosts[0]}
rdzv_port=${RDZV_PORT:-$((10000 + SLURM_JOB_ID % 20000))}  # below Linux's ephemeral ports
{ is_positive_int "$rdzv_port" && ((rdzv_port < 65536)); } || die "RDZV_PORT=$rdzv_port is not a port number"
agents=$SLURM_NTASKS  # one per node, unless --ntasks-per-node says otherwise
restart=${SLURM_RESTART_COUNT:-0}
launch_log "job $SLURM_JOB_ID: SLURM_RESTART_COUNT=$restart, $agents torchrun agents on ${hosts[*]}, rendezvous at $rdzv_host:$rdzv_port"

# Node-local; the restart count keeps a requeued run clear of an earlier run's leftovers.
export AGENT_PIDDIR=${AGENT_PIDDIR:-/tmp/densenet-launch.$SLURM_JOB_ID.$restart}

# SIGUSR1 (--signal=B:USR1@...) reaches this shell only, on the first node. A step that overlaps
# the training (and asks for no GPUs: helper_srun) takes it to the node agents on every node;
# they pass it to the training processes.
warned=0
on_warning() {
    warned=1
    launch_log "SIGUSR1: the job ends soon (time limit or preemption); asking the training to checkpoint and stop"
    # shellcheck disable=SC2016  # $1 and $2 belong to the inner shell
    if ! helper_srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" \
        --ntasks-per-node=1 --cpus-per-task=1 \
        bash -c 'source "$1/lib.sh" && signal_local_agents "$2"' _ "$LAUNCH_DIR" "$AGENT_PIDDIR"; then
        # The training processes agree on stopping, so those on this node are enough.
        launch_log "signalling step failed; signalling the agents on this node only"
        signal_local_agents "$AGENT_PIDDIR"
    fi
}
trap on_warning USR1
trap on_slurm_term TERM

# srun does not pass --cpus-per-task on to its step by itself (SLURM 22.05), so say it again.
# --kill-on-bad-exit: an agent that fails would otherwise leave the others stuck in a collective.
srun --ntasks="$agents" --cpus-per-task="$(cpus_for_task)" --kill-on-bad-exit=1 \
    "$LAUNCH_DIR/node_agent.sh" --nnodes="$agents" \
    --rdzv_backend=c10d --rdzv_endpoint="$rdzv_host:$rdzv_port" --rdzv_id="$SLURM_JOB_ID" \
    "$TRAIN_SCRIPT" "$@" &
wait_until_exit $!
finish_or_requeue "$EXIT_STATUS" "$warned"
