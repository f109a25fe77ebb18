# Functions shared by the launch scripts. Sourced, never run on its own.
# shellcheck shell=bash

launch_log() {
    printf '[launch %s %s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$(hostname -s)" "$*"
}

die() {
    launch_log "error: $*" >&2
    exit 2
}

require_slurm_job() {
    [[ -n "${SLURM_JOB_ID:-}" ]] ||
        die "$(basename "$0") is a SLURM batch script: submit it with sbatch, or use launch/local.sh on a workstation"
}

# Sets REPO_DIR (the repository above LAUNCH_DIR) and TRAIN_SCRIPT (its train_dist.py unless
# set), then loads site.sh: modules, python environment, NCCL.
load_site() {
    REPO_DIR=${REPO_DIR:-$(cd "$LAUNCH_DIR/.." && pwd)}
    TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO_DIR/train_dist.py}
    [[ -f "$TRAIN_SCRIPT" ]] ||
        die "training script $TRAIN_SCRIPT not found; set REPO_DIR to the repository that holds train_dist.py"
    # shellcheck source=launch/site.sh
    source "$LAUNCH_DIR/site.sh"
    command -v torchrun >/dev/null 2>&1 ||
        die "torchrun is not on PATH; set ACTIVATE (or MODULES) in launch/site.sh or in your environment"
}

is_positive_int() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# Devices a CUDA_VISIBLE_DEVICES value ($1) shows: its non-empty comma-separated entries
# (indices, GPU-... or MIG-... UUIDs) up to the first negative one, where CUDA stops reading
# (so "-1" hides every GPU).
count_visible_devices() {
    local n=0 entry entries=()
    IFS=, read -ra entries <<<"$1"
    for entry in "${entries[@]}"; do
        entry=${entry//[[:space:]]/}
        [[ -z "$entry" ]] && continue
        [[ "$entry" == -* ]] && break
        n=$((n + 1))
    done
    echo "$n"
}

# GPUs a workstation's processes may use. nvidia-smi lists every GPU whatever
# CUDA_VISIBLE_DEVICES says, so that variable, when set (even empty), wins.
visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        count_visible_devices "$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# GPUs SLURM gave this node: SLURM_GPUS_ON_NODE when the job asked for GPUs (--gpus-per-node,
# --gres=gpu:N); the visible-device list for sites whose gres plugin sets only that.
gpus_on_node() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    else
        count_visible_devices "${CUDA_VISIBLE_DEVICES:-}"
    fi
}

# CPUs this task may use: --cpus-per-task when given, otherwise the CPUs of the allocation here.
cpus_for_task() {
    echo "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
}

# Decides how many training processes this node runs and sets NPROC: NPROC_PER_NODE if set,
# else one per GPU, else (a CPU-only node, gloo) one per CPU. Shares the CPUs out among the
# processes through OMP_NUM_THREADS unless that is already set.
plan_processes() {
    local gpus cpus
    gpus=$(gpus_on_node)
    cpus=$(cpus_for_task)
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        is_positive_int "$NPROC_PER_NODE" ||
            die "NPROC_PER_NODE=$NPROC_PER_NODE is not a positive integer"
        NPROC=$NPROC_PER_NODE
    elif ((gpus > 0)); then
        NPROC=$gpus
    else
        NPROC=$cpus
    fi
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        OMP_NUM_THREADS=$((cpus / NPROC > 0 ? cpus / NPROC : 1))
        export OMP_NUM_THREADS
    fi
    launch_log "$NPROC training processes on $(hostname -s) ($gpus GPUs, $cpus CPUs, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
}

# torchrun >= 2.5 lets the training processes share its rendezvous store, and keys of the
# previous attempt survive a restart: restarted processes can read a dead peer's address and
# fail to connect (pytorch/pytorch#135712, #167288). With restarts, give each attempt its own store.
isolate_restart_stores() {
    if (($1 > 0)); then
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    fi
}

# The training processes torchrun started (its direct children).
workers_of() {
    pgrep -P "$1" || true
}

# Waits for the background job $1 until it has really exited (a trapped signal interrupts
# `wait` while the job goes on) and sets EXIT_STATUS to its exit status.
wait_until_exit() {
    local pid=$1 again
    while :; do
        EXIT_STATUS=0
        wait "$pid" || EXIT_STATUS=$?
        kill -0 "$pid" 2>/dev/null && continue
        # The job is gone. If a trap cut `wait` short just as it ended, its status is still
        # waiting to be collected; a job already collected answers 127.
        if ((EXIT_STATUS > 128)); then
            again=0
            wait "$pid" 2>/dev/null || again=$?
            ((again != 127)) && EXIT_STATUS=$again
        fi
        return 0
    done
}

# The exit status this node's training ended with. torchrun ends with 1 whenever a worker failed,
# whatever its status, so each worker also leaves its status in folder $1
# (DENSENET_EXIT_STATUS_DIR, see densenet/training/signals.py); $2 is torchrun's own status.
# A status other than 3 (interrupted, checkpoint saved) or 5 (another process lost) is a real
# failure and wins; otherwise the highest one does. A worker killed by a signal leaves none.
trainer_status() {
    local dir=$1 torchrun_status=$2 f code worst=0 failure=
    ((torchrun_status == 0)) && { echo 0; return; }
    for f in "$dir"/rank.*; do
        [[ -e "$f" && "$f" != *.tmp ]] || continue
        code=$(<"$f")
        [[ "$code" =~ ^[0-9]+$ ]] || continue
        case $code in
            0) ;;
            3 | 5) ((code > worst)) && worst=$code ;;
            *) [[ -z "$failure" ]] && failure=$code ;;
        esac
    done
    if [[ -n "$failure" ]]; then
        echo "$failure"
    elif ((worst > 0)); then
        echo "$worst"
    else
        echo "$torchrun_status"
    fi
}

# srun for a short helper step (signalling) while the training step holds the job's GPUs. A
# step asks for all the job's GPUs by default, and before 22.05 --overlap shares only CPUs, so
# it would wait for the training to end. --gres=none asks for none, but only when it is the
# step's whole GPU request: srun also reads the batch shell's SLURM_GPUS* (set by sbatch
# --gpus-per-node and the like) as options, so they go, with the per-GPU CPU, memory and task
# counts (SLURM_NTASKS_PER_GPU would clash with --ntasks-per-node).
helper_srun() {
    env -u SLURM_GPUS -u SLURM_GPUS_PER_NODE -u SLURM_GPUS_PER_SOCKET -u SLURM_GPUS_PER_TASK \
        -u SLURM_CPUS_PER_GPU -u SLURM_MEM_PER_GPU -u SLURM_NTASKS_PER_GPU \
        srun --overlap --gres=none "$@"
}

# Sends SIGUSR1 to every node agent of this job on this node (their pids are in directory $1,
# named after their host, so that a directory that is not node-local after all still works);
# each passes it on to its training processes.
signal_local_agents() {
    local dir=$1 f pid found=0
    for f in "$dir"/agent."$(hostname -s)".*.pid; do
        [[ -e "$f" ]] || continue
        pid=$(<"$f")
        if kill -USR1 "$pid" 2>/dev/null; then
            launch_log "SIGUSR1 sent to node agent $pid ($(basename "$f"))"
            found=1
        fi
    done
    ((found)) || launch_log "no running node agent of this job here (looked in $dir)"
}

# SLURM ends a job (scancel, time limit, preemption) by sending SIGTERM to every process of it,
# the training processes included, and SIGKILL after a grace period. The batch shell must not
# die first (its end would kill the rest at once) nor pass SIGTERM on (a second signal makes the
# trainer exit without its checkpoint): it notes the signal and keeps waiting.
on_slurm_term() {
    TERMINATED=1
    launch_log "SIGTERM: SLURM is ending the job (cancel, time limit or preemption); waiting for the training to stop"
}

# After the training step has ended: done, or requeue because SLURM warned us or a peer was lost
# (status 5), or a failure; a job SLURM itself is ending (SIGTERM) is never requeued here.
# $1 = exit status of the training, $2 = 1 when the warning signal arrived.
finish_or_requeue() {
    local status=$1 warned=$2
    if ((status == 0)); then
        launch_log "training finished (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}); not requeueing"
        exit 0
    fi
    if ((warned)); then
        launch_log "training stopped after the warning signal (status $status); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        launch_log "error: scontrol requeue failed; submit the same command again to resume from the checkpoint" >&2
        exit 3
    fi
    if ((${TERMINATED:-0})); then
        # A preempted job that may be requeued is requeued by SLURM itself; a cancelled one stays so.
        launch_log "training stopped by SLURM's SIGTERM (status $status); not requeueing"
        exit "$status"
    fi
    if ((status == 5)); then
        # A host died, lost its network or froze (densenet/training/signals.py): the survivors saved
        # nothing new, and the last checkpoint is where the requeued job resumes. SLURM drains a
        # node that died; a job that keeps losing peers stops after MAX_LOST_PEER_RESTARTS.
        local restarts=${SLURM_RESTART_COUNT:-0} limit=${MAX_LOST_PEER_RESTARTS:-10}
        if ((restarts >= limit)); then
            launch_log "error: another process of the run was lost again (status 5) after $restarts restarts (MAX_LOST_PEER_RESTARTS=$limit); not requeueing: check the nodes, then submit the same command to resume" >&2
            exit 5
        fi
        launch_log "another process of the run was lost (status 5: a node died, was cut off or froze); requeueing job $SLURM_JOB_ID to resume from its last checkpoint (restart $((restarts + 1)) of at most $limit)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        launch_log "error: scontrol requeue failed; submit the same command again to resume from the checkpoint" >&2
        exit 5
    fi
    launch_log "error: training failed with status $status; not requeueing (see the trainer's messages above)" >&2
    exit "$status"
}
