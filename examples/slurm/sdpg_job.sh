# shellcheck shell=bash
# The body every examples/sdpg_*.sh script sources after setting its variables and flag
# arrays. It is not run on its own. Three modes, chosen by how the script was started:
#
#   bash examples/sdpg_qwen3_4b_tp2.sh --print-config   the resolved config tree as JSON, nothing else
#   bash examples/sdpg_qwen3_4b_tp2.sh --dry-run   validate config + layout here, no GPUs, no Slurm
#   bash examples/sdpg_qwen3_4b_tp2.sh             submit itself with sbatch (the #SBATCH header)
#   (inside the allocation)                        convert if needed, start Ray, train
#
# What the sourcing script must define:
#   SCRIPT            its own path (for self-submission)
#   ARCH              Qwen3 preset the dry run uses when $HF_DIR has no config.json yet
#   HF_DIR MCORE_DIR TRAIN_DATA OUT_DIR        paths (override them from the environment)
#   TRAIN_NODES TRAIN_GPUS_PER_NODE            the Megatron trainer's share of the job
#   ROLLOUT_NODES ROLLOUT_GPUS_PER_NODE        the vLLM fleet's share; ROLLOUT_NODES=0
#                                              shares the trainer's first node (GPUs after
#                                              the trainer's, or CPUs on a CPU-only job)
#   ROLLOUT_CPUS      CPUs Ray may hand to engines (CPU-only jobs; GPU jobs: 1 per engine)
#   TP PP             the trainer's tensor / pipeline parallel sizes
#   EP ETP            optional, default 1: a mixture-of-experts model's expert / expert
#                     tensor parallel sizes (the conversion's --ep/--etp; the script passes
#                     them to the trainer in PARALLEL_ARGS as --ep/--etp, as it does TP/PP)
#   the flag arrays MODEL_ARGS PARALLEL_ARGS ALGO_ARGS SCHEDULE_ARGS ROLLOUT_ARGS
#                   DATA_ARGS EVAL_ARGS CHECKPOINT_ARGS (any `--set section.field=value`)
#   PREPARE           optional: the arguments of $PYTHON that make the model when
#                     $HF_DIR/config.json is missing (the tiny script's warm start)
#
# The Python is chosen here, once, for every script: $PYTHON if set; else the environment
# $SDPG_VENV names; else the repository's own .venv (what tools/install.sh, `make demo`
# and `make test` build); else `python` on PATH. One that cannot import torch,
# megatron.core and sdpg_megatron stops the script with that message.
#
# Resubmitting the same script resumes from the newest complete checkpoint in
# $OUT_DIR/checkpoints (the trainer finds it); a job preempted or near its time limit is
# requeued (#SBATCH --requeue, SIGUSR1 before the limit) and resumes the same way, losing
# at most the steps since the last checkpoint.

set -euo pipefail

EP=${EP:-1} ETP=${ETP:-1}  # dense models: no expert parallelism
TRAIN_ARGS=(
  "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${ALGO_ARGS[@]}" "${SCHEDULE_ARGS[@]}"
  "${ROLLOUT_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_ARGS[@]}" "${CHECKPOINT_ARGS[@]}"
)
TRAIN_WORLD_SIZE=$((TRAIN_NODES * TRAIN_GPUS_PER_NODE))
# The Python (see the header); the repository is importable from any working directory.
if [[ -z ${SDPG_VENV:-} && -z ${PYTHON:-} && -x $SDPG_ROOT/.venv/bin/python ]]; then SDPG_VENV=$SDPG_ROOT/.venv; fi
if [[ -n ${SDPG_VENV:-} ]]; then
  if [[ ! -f $SDPG_VENV/bin/activate ]]; then
    echo "sdpg_job: SDPG_VENV=$SDPG_VENV is not a virtual environment (no bin/activate); run tools/install.sh" >&2
    exit 2
  fi
  source "$SDPG_VENV/bin/activate"
fi
PYTHON=${PYTHON:-python}
export PYTHONPATH="$SDPG_ROOT${PYTHONPATH:+:$PYTHONPATH}"
FIND_MODULES='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "megatron.core", "sdpg_megatron")))'
if ! "$PYTHON" -c "$FIND_MODULES" 2>/dev/null; then
  echo "sdpg_job: PYTHON=$PYTHON ($(command -v "$PYTHON" || echo "not found")) cannot import torch, megatron.core" \
       "and sdpg_megatron; build $SDPG_ROOT/.venv with \`bash tools/install.sh\` (or \`make demo\`), or set" \
       "SDPG_VENV=/path/to/venv or PYTHON=/path/to/python" >&2
  exit 2
fi

# ---------------------------------------------------------------- 1. dry run / submit
# The resolved config, the parallel layout and the per-GPU memory arithmetic, checked
# here without GPUs; exits non-zero naming the field to fix when sizes do not divide or
# the model does not fit.
DRY_RUN=("$PYTHON" -m sdpg_megatron.train --dry-run --world-size "$TRAIN_WORLD_SIZE" --gpus-per-node "$TRAIN_GPUS_PER_NODE")
if ((ROLLOUT_GPUS_PER_NODE > 0)); then
  DRY_RUN+=(--rollout-gpus "$((ROLLOUT_GPUS_PER_NODE * (ROLLOUT_NODES > 0 ? ROLLOUT_NODES : 1)))")
fi
[[ -n $ARCH ]] && DRY_RUN+=(--arch "$ARCH")
prepare_model() {  # scripts that make their own model (the tiny one) do it where it is first needed
  if [[ -n ${PREPARE+x} && ! -f $HF_DIR/config.json ]]; then
    echo "sdpg_job: $HF_DIR does not exist yet: $PYTHON ${PREPARE[*]}"
    "$@" "$PYTHON" "${PREPARE[@]}"
  fi
}
if [[ ${1:-} == --print-config ]]; then  # no model, no data, no GPUs needed
  PYTHONWARNINGS=ignore exec "$PYTHON" -m sdpg_megatron.train --print-config "${TRAIN_ARGS[@]}"
fi
if [[ ${1:-} == --dry-run ]]; then
  prepare_model
  PYTHONWARNINGS=ignore exec "${DRY_RUN[@]}" "${TRAIN_ARGS[@]}"
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  # Outside an allocation: check first (no point queueing a job that cannot start), then
  # submit this same script; the #SBATCH lines at its top give the resources.
  prepare_model
  PYTHONWARNINGS=ignore "${DRY_RUN[@]}" --quiet "${TRAIN_ARGS[@]}"
  exec sbatch --export=ALL,SDPG_ROOT="$SDPG_ROOT" "${SBATCH_ARGS[@]}" "$SCRIPT" "$@"
fi

# ---------------------------------------------------------------- 2. inside the job
cd "$SDPG_ROOT"
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
TRAIN_HOSTS=("${NODES[@]:0:TRAIN_NODES}")
if ((ROLLOUT_NODES > 0)); then
  ROLLOUT_HOSTS=("${NODES[@]:TRAIN_NODES:ROLLOUT_NODES}")
else
  ROLLOUT_HOSTS=("${TRAIN_HOSTS[0]}")
fi
if ((${#NODES[@]} < TRAIN_NODES + ROLLOUT_NODES)); then
  echo "sdpg_job: the allocation has ${#NODES[@]} node(s), the script needs TRAIN_NODES=$TRAIN_NODES + ROLLOUT_NODES=$ROLLOUT_NODES" >&2
  exit 2
fi
# One job on one node talks over loopback (Ray's own switch for that keeps its processes
# there too); across nodes, over each node's address.
if ((${#NODES[@]} == 1)); then
  HEAD_IP=${HEAD_IP:-127.0.0.1}
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
else
  if [[ -z ${HEAD_IP:-} ]]; then
    HEAD_IP=$(srun --overlap --nodes=1 --ntasks=1 -w "${ROLLOUT_HOSTS[0]}" hostname --ip-address | awk '{print $1}') ||
      HEAD_IP=""
  fi
  if [[ -z $HEAD_IP ]]; then
    echo "sdpg_job: could not run a step on ${ROLLOUT_HOSTS[0]} (the Ray head's node; srun's error above):" \
         "is its slurmd up and reachable?" >&2
    exit 1
  fi
  if [[ $HEAD_IP == 127.* ]]; then
    echo "sdpg_job: ${ROLLOUT_HOSTS[0]}'s hostname resolves to '${HEAD_IP}' there, which other nodes cannot reach;" \
         "set HEAD_IP to its address on the cluster network" >&2
    exit 2
  fi
fi
# Each node's own address as the Ray head sees it: the source address of its route to the
# head (Ray's default guess routes towards 8.8.8.8, which a cluster network may not have).
LOCAL_ADDRESS='import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);
s.connect((sys.argv[1], 9)); print(s.getsockname()[0])'
node_ip() { srun --overlap --nodes=1 --ntasks=1 -w "$1" "$PYTHON" -c "$LOCAL_ADDRESS" "$HEAD_IP"; }
RAY_PORT=${RAY_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
MASTER_PORT=${MASTER_PORT:-$((30000 + SLURM_JOB_ID % 10000))}
RAY_TMP=/tmp/sdpg-ray-$SLURM_JOB_ID  # Ray's socket paths must stay short
# Ray's token authentication with a fresh token per job; every step inherits it, the
# driver included, and it never touches the disk.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$OUT_DIR/.vllm-cache} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
echo "sdpg_job: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) trainer ${TRAIN_HOSTS[*]} × $TRAIN_GPUS_PER_NODE," \
     "rollout ${ROLLOUT_HOSTS[*]}, Ray head $HEAD_IP:$RAY_PORT"

# Background steps (Ray) are stopped when the job ends, however it ends.
BACKGROUND=()
cleanup() {
  for pid in "${BACKGROUND[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait "${BACKGROUND[@]}" 2>/dev/null || true
  rm -rf "$RAY_TMP"
}
trap cleanup EXIT
# Near the time limit (--signal=B:USR1@...) put the job back in the queue; the trainer
# gets SIGTERM from Slurm and the requeued job resumes from the last checkpoint.
trap 'echo "sdpg_job: time limit near, requeueing $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1

# ---------------------------------------------------------------- 3. model: make (tiny), convert once
prepare_model srun --overlap --nodes=1 --ntasks=1 -w "${TRAIN_HOSTS[0]}"
if [[ ! -f $HF_DIR/config.json ]]; then
  echo "sdpg_job: HF_DIR=$HF_DIR has no config.json; point HF_DIR at a Hugging Face Qwen3 checkpoint" >&2
  exit 2
fi
# tools/hf_to_mcore.py writes atomically: a preempted conversion leaves nothing at
# $MCORE_DIR and simply runs again on the next start.
if [[ ! -f $MCORE_DIR/metadata.json ]]; then
  echo "sdpg_job: converting $HF_DIR → $MCORE_DIR (TP $TP, PP $PP, EP $EP, ETP $ETP)"
  srun --overlap --nodes=1 --ntasks=1 -w "${TRAIN_HOSTS[0]}" \
    "$PYTHON" tools/hf_to_mcore.py --hf-dir "$HF_DIR" --out "$MCORE_DIR" --tp "$TP" --pp "$PP" --ep "$EP" --etp "$ETP"
fi

# ---------------------------------------------------------------- 4. the Ray cluster
# Head on the first rollout node, a worker on every other rollout node, each offering its
# rollout GPUs (or CPUs). The trainer's first node joins with no resources when it is
# not a rollout node: Ray's driver (trainer rank 0) needs a local raylet. Every node
# registers under its own address (node_ip); the driver finds its raylet by the same rule.
declare -A RAY_HOST_OF=()  # node address → host, to name a node that does not join
declare -A RAY_STEP_HOST=()  # pid of a node's `ray start` step → host, to name a node lost mid-run
ray_node() {  # host, then `ray start` options
  local host=$1 ip; shift
  if [[ $host == "${ROLLOUT_HOSTS[0]}" ]]; then ip=$HEAD_IP; else ip=$(node_ip "$host") || ip=""; fi
  if [[ -z $ip ]]; then
    echo "sdpg_job: could not run a step on $host (srun's error above): is its slurmd up and reachable?" >&2
    exit 1
  fi
  RAY_HOST_OF[$ip]=$host
  srun --overlap --nodes=1 --ntasks=1 -w "$host" --kill-on-bad-exit=0 \
    bash -c "$ROLLOUT_GPU_SELECT exec $PYTHON -m ray.scripts.scripts start --block --disable-usage-stats \
             --node-ip-address=$ip $*" &
  BACKGROUND+=($!)
  RAY_STEP_HOST[$!]=$host
}
if ((ROLLOUT_NODES == 0 && ROLLOUT_GPUS_PER_NODE > 0)); then
  # shared node: the rollout GPUs are the ones after the trainer's
  ROLLOUT_GPU_SELECT="CUDA_VISIBLE_DEVICES=$(seq -s, "$TRAIN_GPUS_PER_NODE" $((TRAIN_GPUS_PER_NODE + ROLLOUT_GPUS_PER_NODE - 1)))"
else
  ROLLOUT_GPU_SELECT=""
fi
RAY_RESOURCES="--num-gpus=$ROLLOUT_GPUS_PER_NODE --num-cpus=${ROLLOUT_CPUS:-$((ROLLOUT_GPUS_PER_NODE > 0 ? ROLLOUT_GPUS_PER_NODE : 1))}"
ray_node "${ROLLOUT_HOSTS[0]}" --head --port="$RAY_PORT" --temp-dir="$RAY_TMP" \
  --include-dashboard=false $RAY_RESOURCES
RAY_NODES=1
for host in "${ROLLOUT_HOSTS[@]:1}"; do
  ray_node "$host" --address="$HEAD_IP:$RAY_PORT" $RAY_RESOURCES
  RAY_NODES=$((RAY_NODES + 1))
done
if [[ ! " ${ROLLOUT_HOSTS[*]} " =~ " ${TRAIN_HOSTS[0]} " ]]; then
  ROLLOUT_GPU_SELECT="" ray_node "${TRAIN_HOSTS[0]}" --address="$HEAD_IP:$RAY_PORT" --num-gpus=0 --num-cpus=0
  RAY_NODES=$((RAY_NODES + 1))
fi
# The addresses of the nodes that have joined, from a client on the head's own node.
LIST_NODES="import ray; ray.init(address='$HEAD_IP:$RAY_PORT', logging_level='ERROR')
print(' '.join(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"
RAY_JOIN_TIMEOUT=${RAY_JOIN_TIMEOUT:-180}
deadline=$((SECONDS + RAY_JOIN_TIMEOUT))
while true; do
  joined=$(timeout 30 srun --overlap --nodes=1 --ntasks=1 -w "${ROLLOUT_HOSTS[0]}" "$PYTHON" -c "$LIST_NODES" \
           2>/dev/null | tail -1) || joined=""
  missing=()
  for ip in "${!RAY_HOST_OF[@]}"; do
    [[ " $joined " == *" $ip "* ]] || missing+=("${RAY_HOST_OF[$ip]} ($ip)")
  done
  ((${#missing[@]} == 0)) && break
  for pid in "${!RAY_STEP_HOST[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "sdpg_job: the Ray node on ${RAY_STEP_HOST[$pid]} exited before the cluster was up (its output above)" >&2
      exit 1
    fi
  done
  if ((SECONDS > deadline)); then
    echo "sdpg_job: after $RAY_JOIN_TIMEOUT s node(s) ${missing[*]} have not joined the Ray cluster at" \
         "$HEAD_IP:$RAY_PORT; see their \`ray start\` output above" >&2
    exit 1
  fi
  sleep 2
done
echo "sdpg_job: Ray cluster up ($RAY_NODES node(s)) after $SECONDS s"

# ---------------------------------------------------------------- 5. train
# One torchrun per trainer node; global rank 0 (first node) is the driver that owns the
# fleet. Slurm's SIGTERM (cancel, preemption) makes every rank unwind and the driver stop
# its engines; the next start resumes from $OUT_DIR/checkpoints.
if ((ROLLOUT_NODES == 0 && TRAIN_GPUS_PER_NODE > 0 && ROLLOUT_GPUS_PER_NODE > 0)); then
  TRAIN_GPU_SELECT="CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((TRAIN_GPUS_PER_NODE - 1)))"
else
  TRAIN_GPU_SELECT=""
fi
TORCHRUN=(
  "$PYTHON" -m torch.distributed.run --nnodes "$TRAIN_NODES" --nproc-per-node "$TRAIN_GPUS_PER_NODE"
  --master-addr "$(if ((${#NODES[@]} == 1)); then echo 127.0.0.1; else echo "${TRAIN_HOSTS[0]}"; fi)"
  --master-port "$MASTER_PORT"
)
printf -v TRAIN_COMMAND '%q ' "${TORCHRUN[@]}"
printf -v TRAIN_FLAGS '%q ' "${TRAIN_ARGS[@]}" --set "rollout.ray_address=$HEAD_IP:$RAY_PORT"
# --ntasks: not the allocation's (a step inherits SLURM_NTASKS), one torchrun per trainer node
srun --overlap --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" --ntasks-per-node=1 \
  -w "$(IFS=,; echo "${TRAIN_HOSTS[*]}")" --kill-on-bad-exit=1 \
  bash -c "$TRAIN_GPU_SELECT exec $TRAIN_COMMAND --node-rank \$SLURM_PROCID -m sdpg_megatron.train $TRAIN_FLAGS" &
TRAINER=$!
# While the trainer runs, every Ray node's step must too: a node that loses its Ray (its
# raylet dies, the node goes away) stops the run here, naming the node, within a few
# seconds rather than when some request to it times out. The job then fails; resubmitting
# it resumes from the last checkpoint.
LOST_NODE=""
while kill -0 "$TRAINER" 2>/dev/null && [[ -z $LOST_NODE ]]; do
  for pid in "${!RAY_STEP_HOST[@]}"; do
    kill -0 "$pid" 2>/dev/null || LOST_NODE=${RAY_STEP_HOST[$pid]}
  done
  sleep 2  # a trapped signal (USR1) runs after it
done
if [[ -n $LOST_NODE ]]; then
  echo "sdpg_job: node $LOST_NODE lost its Ray node (its \`ray start\` step ended) during the run;" \
       "stopping the trainer" >&2
  kill -TERM "$TRAINER" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$TRAINER" 2>/dev/null || break; sleep 1; done
  kill -KILL "$TRAINER" 2>/dev/null || true
fi
# `wait` returns early when a trapped signal (USR1) arrives; keep waiting for the trainer.
status=0
while true; do
  wait "$TRAINER" && status=0 || status=$?
  kill -0 "$TRAINER" 2>/dev/null || break
done
if [[ -z $LOST_NODE ]] && ((status != 0)); then  # the trainer may have failed first, over a node's loss
  for pid in "${!RAY_STEP_HOST[@]}"; do kill -0 "$pid" 2>/dev/null || LOST_NODE=${RAY_STEP_HOST[$pid]}; done
fi
if [[ -n $LOST_NODE ]]; then
  echo "sdpg_job: run stopped: node $LOST_NODE lost its Ray node (trainer exit status $status)" >&2
  exit 1
fi
echo "sdpg_job: trainer exited with status $status"
exit "$status"
