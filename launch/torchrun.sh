#!/usr/bin/env bash
# Train with torchrun on one node or several (c10d rendezvous), Hydra overrides passed through.
#
#   launch/torchrun.sh [OPTIONS] [--] [HYDRA OVERRIDES...]
#
# Each option falls back to an environment variable, then to a default:
#   --nnodes N           NNODES          nodes in the job (SLURM_NNODES, else 1)
#   --nproc-per-node G   NPROC_PER_NODE  processes per node (SLURM_GPUS_ON_NODE, else the visible GPUs, else 1)
#   --node-rank R        NODE_RANK       this node's rank; node 0 hosts the rendezvous (SLURM_NODEID, else 0)
#   --head ADDR[:PORT]   HEAD_ADDR       rendezvous endpoint on node 0 (localhost); HEAD_PORT (29500)
#   --run-id ID          RUN_ID          the job's id, the same on every node (SLURM_JOB_ID; needed with
#                                        several nodes); the run directory is outputs/torchrun-ID
#   --max-restarts K     MAX_RESTARTS    restarts of failed workers, each resuming: K > 0 adds resume=auto
#                                        unless a resume=... override is given (0)
#   PYTHON runs torch.distributed.run (default: the active environment's python, else the checkout's .venv,
#   else python; the first line of output names it); TORCHRUN_ARGS adds raw torchrun options.
#
# Examples:
#   launch/torchrun.sh --nproc-per-node 8 strategy=fsdp
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --head node0:29500 --run-id exp1 strategy=fsdp   # on node0
#   launch/torchrun.sh --nnodes 2 --node-rank 1 --head node0:29500 --run-id exp1 strategy=fsdp   # on node1
set -euo pipefail

# The interpreter: PYTHON, else the active environment's, else this checkout's .venv (launch/python.sh).
# shellcheck source=launch/python.sh
. "$(dirname "${BASH_SOURCE[0]}")/python.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "torchrun.sh: $*" >&2; exit 2; }

visible_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

nnodes=${NNODES:-${SLURM_NNODES:-1}}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
head=${HEAD_ADDR:-}
run_id=${RUN_ID:-${SLURM_JOB_ID:-}}
max_restarts=${MAX_RESTARTS:-0}
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=${2:?--nnodes needs a value}; shift 2 ;;
    --nproc-per-node) nproc=${2:?--nproc-per-node needs a value}; shift 2 ;;
    --node-rank) node_rank=${2:?--node-rank needs a value}; shift 2 ;;
    --head) head=${2:?--head needs a value}; shift 2 ;;
    --run-id) run_id=${2:?--run-id needs a value}; shift 2 ;;
    --max-restarts) max_restarts=${2:?--max-restarts needs a value}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    -*) die "unknown option $1 (Hydra overrides have no leading dash; see --help)" ;;
    *) overrides+=("$1"); shift ;;
  esac
done

if [ -z "$nproc" ]; then
  nproc=$(visible_gpus)
  [ "$nproc" -gt 0 ] || nproc=1
fi
for pair in "nnodes=$nnodes" "nproc-per-node=$nproc" "node-rank=$node_rank" "max-restarts=$max_restarts"; do
  [[ ${pair#*=} =~ ^[0-9]+$ ]] || die "--${pair%%=*} must be a whole number, got '${pair#*=}'"
done
[ "$nnodes" -ge 1 ] && [ "$nproc" -ge 1 ] || die "--nnodes and --nproc-per-node must be at least 1"
[ "$node_rank" -lt "$nnodes" ] || die "--node-rank $node_rank is not below --nnodes $nnodes"

if [ "$nnodes" -gt 1 ]; then
  [ -n "$head" ] || die "several nodes need the rendezvous address of node 0: --head ADDR[:PORT] or HEAD_ADDR"
  [ -n "$run_id" ] || die "several nodes need the same job id on every node: --run-id ID or RUN_ID"
  [[ $head == *:* ]] || head="$head:${HEAD_PORT:-29500}"
else
  head=${head:-localhost:0} # one node: a free port, as torchrun --standalone
  run_id=${run_id:-$(date +%Y-%m-%d_%H-%M-%S)-$$}
fi
is_host=false
[ "$node_rank" -eq 0 ] && is_host=true
# A restarted worker must continue from the last checkpoint: without resume, it would refuse the run directory.
resume=()
if [ "$max_restarts" -gt 0 ]; then
  resume=(resume=auto)
  for arg in ${overrides[@]+"${overrides[@]}"}; do
    case "$arg" in resume=*) resume=() ;; esac
  done
fi

# The workers catch SIGUSR1 (Slurm's warning before the time limit): checkpoint, then exit for a requeue.
# The agent must not die of it meanwhile; an ignored signal stays ignored across exec.
trap '' USR1
pick_python
echo "torchrun.sh: python is $python ($python_why)" >&2
# shellcheck disable=SC2086 # TORCHRUN_ARGS is a list of options
exec "$python" -m torch.distributed.run \
  --nnodes "$nnodes" \
  --nproc-per-node "$nproc" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$head" \
  --rdzv-id "$run_id" \
  --rdzv-conf "is_host=$is_host" \
  --max-restarts "$max_restarts" \
  ${TORCHRUN_ARGS:-} \
  -m trainer.train ${resume[@]+"${resume[@]}"} ${overrides[@]+"${overrides[@]}"}
