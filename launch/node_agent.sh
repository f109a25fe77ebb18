#!/bin/bash
# Runs one torchrun agent on this node and passes SIGUSR1 on to its training processes.
#
#   launch/node_agent.sh <torchrun arguments without --nproc_per_node and --max-restarts...>
#
# The number of processes is this node's share of the SLURM allocation (one per GPU, or one
# per CPU on a CPU-only node; NPROC_PER_NODE overrides it), see plan_processes in lib.sh.
# MAX_RESTARTS (default 0) is torchrun's --max-restarts: how often it restarts all processes of
# the node when one of them fails.
#
# SLURM's warning signal before a time limit or preemption is SIGUSR1, and torchrun does not
# forward SIGUSR1 (only SIGTERM and SIGINT, which it follows with SIGKILL 30 s later). The batch
# scripts therefore start torchrun through this wrapper and signal the wrapper; the wrapper
# signals the workers, which checkpoint and exit with status 3.
#
# torchrun ends with status 1 whenever a worker failed; the wrapper ends with the workers' own
# status instead (trainer_status in lib.sh), so that the batch scripts can tell a lost peer (5,
# requeue) from a bad input (2, do not).
#
# With AGENT_PIDDIR set, the wrapper writes its pid to AGENT_PIDDIR/agent.<host>.<SLURM_PROCID>.pid so
# that a signalling step on the same node can find it (the multi-node script does this).
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"

(($# > 0)) || die "usage: $0 <torchrun arguments...>"
plan_processes
max_restarts=${MAX_RESTARTS:-0}
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$max_restarts is not a number of restarts"
isolate_restart_stores "$max_restarts"

forwarded=0
watcher_pid=
on_usr1() {
    if ((forwarded)); then
        # A second USR1 would make the trainer exit at once, without its checkpoint.
        launch_log "SIGUSR1 again: already passed on, ignoring it"
        return
    fi
    forwarded=1
    local workers
    workers=$(workers_of "$torchrun_pid")
    if [[ -z "$workers" ]]; then
        launch_log "SIGUSR1 before torchrun started its workers: stopping torchrun"
        kill -TERM "$torchrun_pid" 2>/dev/null || true
        return
    fi
    # shellcheck disable=SC2086  # one pid per word
    launch_log "SIGUSR1: passing it on to the training processes" $workers
    # shellcheck disable=SC2086
    kill -USR1 $workers 2>/dev/null || true
    # The workers checkpoint and exit 3, and torchrun would start them again if it may
    # restart them: stop it as soon as they are gone.
    if ((max_restarts > 0)); then
        (
            for w in $workers; do
                while kill -0 "$w" 2>/dev/null; do sleep 0.2; done
            done
            launch_log "training processes gone after the warning signal: stopping torchrun before it restarts them"
            kill -TERM "$torchrun_pid" 2>/dev/null || true
        ) &
        watcher_pid=$!
    fi
}

# Node-local, one per agent: where each worker leaves its exit status.
status_dir=$(mktemp -d "${TMPDIR:-/tmp}/densenet-status.XXXXXX")
export DENSENET_EXIT_STATUS_DIR=$status_dir

# torchrun and, until the trainer installs its handler, the workers ignore SIGUSR1: a signal
# sent to the whole job step must not kill them before they can checkpoint.
(
    trap '' USR1
    exec torchrun --nproc_per_node="$NPROC" --max-restarts="$max_restarts" "$@"
) &
torchrun_pid=$!
trap on_usr1 USR1
# Under SLURM, torchrun and the training processes get SLURM's SIGTERM themselves; this
# wrapper only must not end first, or the step would end with it.
trap 'launch_log "SIGTERM: waiting for torchrun to stop"' TERM

pidfile=
if [[ -n "${AGENT_PIDDIR:-}" ]]; then
    mkdir -p "$AGENT_PIDDIR"
    pidfile=$AGENT_PIDDIR/agent.$(hostname -s).${SLURM_PROCID:-0}.pid
    echo $$ >"$pidfile"
fi
on_exit() {
    if [[ -n "$watcher_pid" ]]; then kill "$watcher_pid" 2>/dev/null || true; fi
    rm -rf "$status_dir"
    if [[ -n "$pidfile" ]]; then
        rm -f "$pidfile"
        rmdir "$AGENT_PIDDIR" 2>/dev/null || true  # the last agent on the node removes it
    fi
}
trap on_exit EXIT

wait_until_exit "$torchrun_pid"
status=$(trainer_status "$status_dir" "$EXIT_STATUS")
if ((status != EXIT_STATUS)); then
    launch_log "torchrun ended with status $EXIT_STATUS; the training processes with status $status"
fi
exit "$status"
