#!/usr/bin/env bash
# SDPG-URKL on Qwen3-4B: the paper's main setting as the authors ran it (docs/parity.md
# compares every setting with the paper and the authors' script), Megatron TP2.
#
#   bash examples/sdpg_qwen3_4b_tp2.sh --print-config   # the resolved config tree (JSON)
#   bash examples/sdpg_qwen3_4b_tp2.sh --dry-run        # check config, layout and memory here
#   bash examples/sdpg_qwen3_4b_tp2.sh                  # submit (sbatch) — run it again to resume
#
# Thinking mode on (the 4096-token response budget includes the thinking; the answer is
# the last \boxed{} after </think>), rewards +1 / −1 plus the overlong penalty, π_old
# recomputed by the trainer, LR warm-up over 10 rollout steps, DAPO dynamic sampling (up
# to 10 generation batches), evaluation before training and every 10 steps.
#
# One node of 8 × 80 GB GPUs: GPUs 0–3 train (TP2 × DP2), GPUs 4–7 hold four vLLM engines
# (TP1 each) that get the trainer's weights after every optimizer step. 400 steps of
# 128 prompts × 8 responses, 8 PPO mini-batches per step, prompts ≤ 2048 and responses
# ≤ 4096 tokens; micro-batches of 1 sequence of up to 6144 tokens (2 fit by the estimate,
# 69 of 72 GiB, too close for an estimate).
#
# Memory per training GPU, from `--dry-run` (GiB; bf16 weights, fp32 grad buffer, Adam's
# fp32 main params + m + v split over DP by the distributed optimizer, a frozen bf16 π_ref,
# activations of one micro-batch without recomputation, the teacher's hidden states of one
# mini-batch slice, the fused loss's chunk buffers, 3 GiB CUDA/NCCL):
#   trainer    4 GPUs (one node of 4): TP 2 × PP 1 × DP 2
#   memory     per GPU, GiB     stage 0
#     weights                     3.75
#     gradients                   7.49
#     optimizer_state            11.24
#     reference_weights           3.75
#     activations                18.46
#     teacher_states              1.25
#     loss_buffers                1.52
#     overhead                    3.00
#     total                      50.45   of 72.0 (90% of 80): fits
#   rollout    4 engine(s) × TP 1 = 4 GPUs (of 4), bfloat16: 7.49 GiB weights and 58.51 GiB KV cache per GPU = 69 sequences of 6,144 tokens per engine
#
# Paths come from the environment (defaults below); the Megatron checkpoint is converted
# from the HF one on first start, and every start resumes from $OUT_DIR/checkpoints.
#SBATCH --job-name=sdpg-qwen3-4b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

SDPG_ROOT=${SDPG_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
SCRIPT=$SDPG_ROOT/examples/sdpg_qwen3_4b_tp2.sh
ARCH=qwen3-4b

# --- where things are
HF_DIR=${HF_DIR:-$HOME/models/Qwen3-4B}                       # Hugging Face checkpoint (config, tokenizer, weights)
MCORE_DIR=${MCORE_DIR:-$HOME/models/Qwen3-4B-mcore-tp2}       # converted here on first start
TRAIN_DATA=${TRAIN_DATA:-$HOME/data/dapo-math-en.parquet}     # tools/prepare_dapo.py: the unique English DAPO-Math-17k rows
EVAL_DIR=${EVAL_DIR:-$SDPG_ROOT/data/eval}                    # AIME 2024/2025, AMC 2023
OUT_DIR=${OUT_DIR:-$SDPG_ROOT/runs/sdpg-qwen3-4b}             # metrics, checkpoints, eval

# --- how the job's GPUs are split
TRAIN_NODES=1 TRAIN_GPUS_PER_NODE=4                           # Megatron: TP2 × DP2
ROLLOUT_NODES=0 ROLLOUT_GPUS_PER_NODE=4                       # vLLM: 4 engines × TP1 on the same node, GPUs 4–7
TP=2 PP=1
SBATCH_ARGS=()

# --- the trainer's flags, one group per concern (any config field: --set section.field=value)
MODEL_ARGS=(--hf-dir "$HF_DIR" --set model.mcore_dir="$MCORE_DIR" --set model.params_dtype=bfloat16)
PARALLEL_ARGS=(--tp "$TP" --pp "$PP")
ALGO_ARGS=(--preset sdpg-urkl)                                # α = β_base = 1e-3, β warm-up 50, decay 350, KL clamp 20
SCHEDULE_ARGS=(--steps 400 --seed 0
  --set schedule.prompts_per_step=128 --set algorithm.group_size=8
  --set schedule.minibatches_per_step=8 --set schedule.micro_batch_size=1
  --set schedule.max_tokens_per_micro_batch=6144  # dynamic batching: the authors' 6144 tokens per GPU
  --set schedule.dynamic_sampling=true --set schedule.max_generation_batches=10)  # DAPO group filter
ROLLOUT_ARGS=(--set rollout.num_engines=4 --set rollout.engine_tensor_parallel=1 --set rollout.gpus_per_engine=1
  --set rollout.dtype=bfloat16 --set rollout.kv_cache_bytes=none --set rollout.gpu_memory_utilization=0.85
  --set rollout.max_response_tokens=4096 --set reward.overlong_buffer=512 --set reward.num_workers=16)
DATA_ARGS=(--train-data "$TRAIN_DATA" --set data.max_prompt_tokens=2048 --set data.enable_thinking=true)  # Qwen3 thinking mode
EVAL_ARGS=(--set "evaluation.benchmarks=aime24=$EVAL_DIR/aime-2024.parquet,aime25=$EVAL_DIR/aime25.parquet,amc23=$EVAL_DIR/amc-23.parquet"
  --set evaluation.interval=10 --set evaluation.at_start=true --set evaluation.k=32)  # authors: before training, every 10
CHECKPOINT_ARGS=(--out-dir "$OUT_DIR" --set checkpoint.interval=25 --set checkpoint.keep_last=2)

source "$SDPG_ROOT/examples/slurm/sdpg_job.sh"
