#!/usr/bin/env bash
# SDPG-URKL on Qwen3-30B-A3B (mixture of experts), scaled out: Megatron TP2 × DP8 with the
# experts over EP8 on two nodes, vLLM on a third.
#
#   bash examples/sdpg_qwen3_30b_a3b.sh --dry-run   # check config, layout and memory here
#   bash examples/sdpg_qwen3_30b_a3b.sh             # submit (sbatch) — run it again to resume
#
# Three nodes of 8 × 80 GB GPUs. Nodes 0–1 train: attention and embeddings at TP2 with
# sequence parallelism (Megatron's MoE layer trains at TP > 1 only with it) × DP8; each
# layer's 128 experts over EP8 (16 per GPU, the all-to-all inside a node) × expert DP2.
# Node 2 holds four vLLM engines of TP2 (61 GB of bf16 weights per engine, every expert
# included; ~31 GB per GPU). The experts are 95% of the 30.5B parameters: their bf16
# weights, fp32 gradients and π_ref are split by EP, their Adam state (12 B per parameter)
# over all 16 GPUs whatever EP — on one node of 8 it alone would take 40 GiB per GPU.
# Full recomputation in one-layer units: without it every layer keeps the 8 routed copies
# of each token, 44 GiB per micro-batch of 2. docs/method.md's defaults: 128 prompts × 8,
# 8 mini-batches, prompts ≤ 2048, responses ≤ 4096 tokens; micro-batches of 2 sequences.
#
# Memory per training GPU, from `--dry-run` (GiB; the non-expert rows as in the dense
# scripts — bf16 weights, fp32 grad buffer, Adam's fp32 main params + m + v split over DP by
# the distributed optimizer, a frozen bf16 π_ref — then the same four for the experts, Adam
# split over expert DP; activations of one micro-batch under full recomputation with routing
# assumed balanced, the teacher's hidden states of one mini-batch slice, the fused loss's
# chunk buffers, 3 GiB CUDA/NCCL):
#   trainer    16 GPUs (2 nodes × 8): TP 2 × PP 1 × DP 8, EP 8 × ETP 1 (16 experts per rank,
#              expert DP 2), sequence parallel
#   memory     per GPU, GiB       stage 0
#     weights                       1.45
#     gradients                     2.90
#     optimizer_state               1.09
#     reference_weights             1.45
#     expert_weights                6.75
#     expert_gradients             13.50
#     expert_optimizer_state       20.25
#     expert_reference_weights      6.75
#     activations                   2.05
#     teacher_states                0.25
#     loss_buffers                  1.53
#     overhead                      3.00
#     total                        60.95   of 72.0 (90% of 80): fits
#   rollout    4 engine(s) × TP 2 = 8 GPUs (of 8), bfloat16: 28.44 GiB weights and 37.56 GiB KV cache per GPU
#              = 133 sequences of 6,144 tokens per engine
#
# Paths come from the environment (defaults below); the Megatron checkpoint is converted
# from the HF one on first start, and every start resumes from $OUT_DIR/checkpoints.
#SBATCH --job-name=sdpg-qwen3-30b-a3b
#SBATCH --nodes=3
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
SCRIPT=$SDPG_ROOT/examples/sdpg_qwen3_30b_a3b.sh
ARCH=qwen3-30b-a3b

# --- where things are
HF_DIR=${HF_DIR:-$HOME/models/Qwen3-30B-A3B}                  # Hugging Face checkpoint (config, tokenizer, weights)
MCORE_DIR=${MCORE_DIR:-$HOME/models/Qwen3-30B-A3B-mcore-tp2-ep8}  # converted here on first start
TRAIN_DATA=${TRAIN_DATA:-$HOME/data/dapo-math-en.parquet}     # tools/prepare_dapo.py: unique English DAPO rows
EVAL_DIR=${EVAL_DIR:-$SDPG_ROOT/data/eval}                    # AIME 2024/2025, AMC 2023
OUT_DIR=${OUT_DIR:-$SDPG_ROOT/runs/sdpg-qwen3-30b-a3b}        # metrics, checkpoints, eval

# --- how the job's GPUs are split
TRAIN_NODES=2 TRAIN_GPUS_PER_NODE=8                           # Megatron: TP2 × DP8, experts EP8 × expert DP2, nodes 0–1
ROLLOUT_NODES=1 ROLLOUT_GPUS_PER_NODE=8                       # vLLM: 4 engines × TP2 on node 2
TP=2 PP=1 EP=8 ETP=1
SBATCH_ARGS=()

# --- the trainer's flags, one group per concern (any config field: --set section.field=value)
MODEL_ARGS=(--hf-dir "$HF_DIR" --set model.mcore_dir="$MCORE_DIR" --set model.params_dtype=bfloat16)
PARALLEL_ARGS=(--tp "$TP" --pp "$PP" --ep "$EP" --etp "$ETP"
  --set parallel.sequence_parallel=true  # Megatron's MoE layer needs it at TP > 1
  --set parallel.recompute_granularity=full --set parallel.recompute_method=uniform
  --set parallel.recompute_num_layers=1)
ALGO_ARGS=(--preset sdpg-urkl)                                # docs/method.md: α = β_base = 1e-3, warm-up 50, decay 350
SCHEDULE_ARGS=(--steps 400 --seed 0
  --set schedule.prompts_per_step=128 --set algorithm.group_size=8
  --set schedule.minibatches_per_step=8 --set schedule.micro_batch_size=2
  --set schedule.dynamic_sampling=true --set schedule.max_generation_batches=10)  # DAPO group filter
ROLLOUT_ARGS=(--set rollout.num_engines=4 --set rollout.engine_tensor_parallel=2 --set rollout.gpus_per_engine=2
  --set rollout.dtype=bfloat16 --set rollout.kv_cache_bytes=none --set rollout.gpu_memory_utilization=0.85
  --set rollout.max_response_tokens=4096 --set reward.overlong_buffer=512 --set reward.num_workers=16)
DATA_ARGS=(--train-data "$TRAIN_DATA" --set data.max_prompt_tokens=2048
  --set data.enable_thinking=true)  # Qwen3 thinking mode
BENCHMARKS=aime24=$EVAL_DIR/aime-2024.parquet,aime25=$EVAL_DIR/aime25.parquet,amc23=$EVAL_DIR/amc-23.parquet
EVAL_ARGS=(--set "evaluation.benchmarks=$BENCHMARKS" --set evaluation.k=32
  --set evaluation.interval=10 --set evaluation.at_start=true)  # authors: before training, every 10
CHECKPOINT_ARGS=(--out-dir "$OUT_DIR" --set checkpoint.interval=25 --set checkpoint.keep_last=2)

source "$SDPG_ROOT/examples/slurm/sdpg_job.sh"
