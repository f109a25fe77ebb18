# shellcheck shell=bash
# Cluster specifics, in one place. Every launch script sources this file, on every node, before
# it starts torchrun. Edit the defaults below for your cluster, or leave the file alone and set
# the same variables in the environment you submit from (sbatch passes your environment on).
#
# Partition, account, time limit and GPU count are #SBATCH lines at the top of each batch script;
# they can also come from the command line (sbatch --partition=... --account=...) or from
# sbatch's own environment variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT).

# Environment modules to load first, space-separated, e.g. "cuda/12.4 nccl/2.21".
: "${MODULES:=}"

# A command that puts the right python and torchrun on PATH, e.g.
#   'source $HOME/venvs/densenet/bin/activate'
#   'eval "$(conda shell.bash hook)" && conda activate densenet'   (batch shells lack conda's hook)
# Empty: use whatever torchrun the job inherits from the shell it was submitted from.
: "${ACTIVATE:=}"

# NCCL: uncomment what your fabric needs. Wrong interface names hang the first all-reduce, so
# check them with `ip -br link` on a compute node.
# export NCCL_SOCKET_IFNAME=ib0          # or eth0; the interface that reaches the other nodes
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_DEBUG=WARN                 # INFO prints the chosen transports, once per rank
# export NCCL_ASYNC_ERROR_HANDLING=1     # turn a dead peer into an error instead of a hang

if [[ -n "$MODULES" ]]; then
    # `module` is a shell function that batch shells do not always define.
    if ! command -v module >/dev/null 2>&1 && [[ -f /etc/profile.d/modules.sh ]]; then
        # shellcheck source=/dev/null
        source /etc/profile.d/modules.sh
    fi
    # shellcheck disable=SC2086  # one word per module
    module load $MODULES
fi

if [[ -n "$ACTIVATE" ]]; then
    # conda's shell hook and venv activate scripts reference unset variables.
    set +u
    eval "$ACTIVATE"
    set -u
fi
