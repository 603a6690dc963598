#!/usr/bin/env bash
# Train with the `deepspeed` launcher over the hosts of a hostfile, Hydra overrides passed through.
#
#   launch/deepspeed.sh [OPTIONS] [--] [HYDRA OVERRIDES...]
#
# Each option falls back to an environment variable, then to a default:
#   --hostfile FILE      HOSTFILE     lines of `HOST slots=GPUS` (DeepSpeed's /job/hostfile; none: this node)
#   --num-gpus G         NUM_GPUS     GPUs per host (all of each host's slots)
#   --num-nodes N        NUM_NODES    use the first N hosts of the hostfile (all)
#   --master-addr ADDR   MASTER_ADDR  address of the first host, where rank 0 runs (the first host)
#   --master-port PORT   MASTER_PORT  its port (29500)
#   --run-id ID          RUN_ID       names the run directory outputs/deepspeed-ID (date and time), passed to
#                                     every host as hydra.run.dir unless the overrides set one
#   --dry-run                         print the command instead of running it
#   PYTHON runs deepspeed.launcher.runner (default: the active environment's python, else the checkout's
#   .venv, else python; the first line of output, on stderr, names it); DEEPSPEED_ARGS adds raw launcher options. Multi-host
#   runs need passwordless ssh (pdsh) between the hosts, as the deepspeed launcher does.
#
# Example:
#   printf 'node0 slots=8\nnode1 slots=8\n' > hostfile
#   launch/deepspeed.sh --hostfile hostfile strategy=zero3 optimizer=adam_deepspeed
set -euo pipefail

# The interpreter: PYTHON, else the active environment's, else this checkout's .venv (launch/python.sh).
# shellcheck source=launch/python.sh
. "$(dirname "${BASH_SOURCE[0]}")/python.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "deepspeed.sh: $*" >&2; exit 2; }

hostfile=${HOSTFILE:-}
num_gpus=${NUM_GPUS:-}
num_nodes=${NUM_NODES:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
run_id=${RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
dry_run=false
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) hostfile=${2:?--hostfile needs a value}; shift 2 ;;
    --num-gpus) num_gpus=${2:?--num-gpus needs a value}; shift 2 ;;
    --num-nodes) num_nodes=${2:?--num-nodes needs a value}; shift 2 ;;
    --master-addr) master_addr=${2:?--master-addr needs a value}; shift 2 ;;
    --master-port) master_port=${2:?--master-port needs a value}; shift 2 ;;
    --run-id) run_id=${2:?--run-id needs a value}; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    -*) die "unknown option $1 (Hydra overrides have no leading dash; see --help)" ;;
    *) overrides+=("$1"); shift ;;
  esac
done
[ -z "$hostfile" ] || [ -r "$hostfile" ] || die "hostfile $hostfile not found"

# Every host must write into the same run directory: name it once here, for all of them.
run_dir_given=false
for arg in ${overrides[@]+"${overrides[@]}"}; do
  [[ $arg == hydra.run.dir=* ]] && run_dir_given=true
done
$run_dir_given || overrides+=("hydra.run.dir=outputs/deepspeed-$run_id")

pick_python
echo "deepspeed.sh: python is $python ($python_why)" >&2
cmd=("$python" -m deepspeed.launcher.runner --master_port "$master_port")
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$num_gpus" ] || cmd+=(--num_gpus "$num_gpus")
[ -z "$num_nodes" ] || cmd+=(--num_nodes "$num_nodes")
[ -z "$master_addr" ] || cmd+=(--master_addr "$master_addr")
# shellcheck disable=SC2206 # DEEPSPEED_ARGS is a list of options
cmd+=(${DEEPSPEED_ARGS:-} --module trainer.train "${overrides[@]}")
if $dry_run; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
