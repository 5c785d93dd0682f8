#!/usr/bin/env bash
# SDPG-URKL on Qwen3-235B-A22B (mixture of experts), scaled out: Megatron TP4 × PP2 × DP16
# with the experts over EP32 on sixteen nodes, vLLM on four more.
#
#   bash examples/sdpg_qwen3_235b_a22b.sh --dry-run   # check config, layout and memory here
#   bash examples/sdpg_qwen3_235b_a22b.sh             # submit (sbatch) — run it again to resume
#
# Twenty nodes of 8 × 80 GB GPUs. Nodes 0–15 train: attention and embeddings at TP4 (the
# model's 4 KV heads allow no more) with sequence parallelism (Megatron's MoE layer trains
# at TP > 1 only with it) × PP2 × DP16; PP2 puts 47 of the 94 layers on each stage (this
# recipe splits layers evenly, and 94 = 2 × 47 leaves PP 1, 2 or 47). Each layer's 128
# experts go over EP32 (4 per GPU, the all-to-all over 4 nodes) × expert DP2. The experts
# are 97% of the 235B parameters: their bf16 weights, fp32 gradients and π_ref (8 B per
# parameter) are split by EP × PP (at EP16 they would take 53 GiB per GPU), their Adam state
# (12 B per parameter) over all 64 GPUs of a stage whatever EP — on 8 training nodes it
# would double to 40 GiB per GPU and the layout would not fit. Nodes 16–19 hold one vLLM
# engine of TP8 each (470 GB of bf16 weights, every expert included: 54.7 GiB per GPU,
# leaving 15 GiB of KV cache at gpu_memory_utilization 0.9): an engine is one Ray bundle on
# one node, and TP8 is the smallest that holds the model on 80 GB GPUs; more rollout nodes
# add engines. docs/method.md's defaults: 128 prompts × 8, 8 mini-batches, prompts ≤ 2048,
# responses ≤ 4096 tokens; micro-batches of 1 sequence (every micro-batch has the same
# shape, as the pipeline's send/receive buffers need); full recomputation in one-layer units.
#
# Memory per training GPU, from `--dry-run` (GiB; the non-expert rows as in the dense
# scripts — bf16 weights, fp32 grad buffer, Adam's fp32 main params + m + v split over DP by
# the distributed optimizer, a frozen bf16 π_ref — then the same four for the experts, Adam
# split over expert DP; activations of the micro-batches in flight under full recomputation
# with routing assumed balanced, the teacher's hidden states of one mini-batch slice, the
# fused loss's chunk buffers, 3 GiB CUDA/NCCL):
#   trainer    128 GPUs (16 nodes × 8): TP 4 × PP 2 × DP 16, EP 32 × ETP 1 (4 experts per rank,
#              expert DP 2), sequence parallel
#   memory     per GPU, GiB       stage 0   stage 1
#     weights                       1.90      1.90
#     gradients                     3.79      3.79
#     optimizer_state               0.71      0.71
#     reference_weights             1.90      1.90
#     expert_weights                6.61      6.61
#     expert_gradients             13.22     13.22
#     expert_optimizer_state       19.83     19.83
#     expert_reference_weights      6.61      6.61
#     activations                   1.55      1.00
#     teacher_states                0.00      0.25
#     loss_buffers                  0.00      1.53
#     overhead                      3.00      3.00
#     total                        59.12     60.35   of 72.0 (90% of 80): fits
#   rollout    4 engine(s) × TP 8 = 32 GPUs (of 32), bfloat16: 54.74 GiB weights and 15.26 GiB KV cache per GPU
#              = 55 sequences of 6,144 tokens per engine
#
# Paths come from the environment (defaults below); the Megatron checkpoint is converted
# from the HF one on first start, and every start resumes from $OUT_DIR/checkpoints.
#SBATCH --job-name=sdpg-qwen3-235b-a22b
#SBATCH --nodes=20
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
SCRIPT=$SDPG_ROOT/examples/sdpg_qwen3_235b_a22b.sh
ARCH=qwen3-235b-a22b

# --- where things are
HF_DIR=${HF_DIR:-$HOME/models/Qwen3-235B-A22B}                # Hugging Face checkpoint (config, tokenizer, weights)
MCORE_DIR=${MCORE_DIR:-$HOME/models/Qwen3-235B-A22B-mcore-tp4-pp2-ep32}  # converted here on first start
TRAIN_DATA=${TRAIN_DATA:-$HOME/data/dapo-math-en.parquet}     # tools/prepare_dapo.py: unique English DAPO rows
EVAL_DIR=${EVAL_DIR:-$SDPG_ROOT/data/eval}                    # AIME 2024/2025, AMC 2023
OUT_DIR=${OUT_DIR:-$SDPG_ROOT/runs/sdpg-qwen3-235b-a22b}      # metrics, checkpoints, eval

# --- how the job's GPUs are split
TRAIN_NODES=16 TRAIN_GPUS_PER_NODE=8                          # Megatron: TP4 × PP2 × DP16, experts EP32 × expert DP2
ROLLOUT_NODES=4 ROLLOUT_GPUS_PER_NODE=8                       # vLLM: 4 engines × TP8, one per node 16–19
TP=4 PP=2 EP=32 ETP=1
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
  --set schedule.minibatches_per_step=8 --set schedule.micro_batch_size=1
  --set schedule.dynamic_sampling=true --set schedule.max_generation_batches=10)  # DAPO group filter
ROLLOUT_ARGS=(--set rollout.num_engines=4 --set rollout.engine_tensor_parallel=8 --set rollout.gpus_per_engine=8
  --set rollout.dtype=bfloat16 --set rollout.kv_cache_bytes=none --set rollout.gpu_memory_utilization=0.90
  --set rollout.max_response_tokens=4096 --set reward.overlong_buffer=512 --set reward.num_workers=16)
DATA_ARGS=(--train-data "$TRAIN_DATA" --set data.max_prompt_tokens=2048
  --set data.enable_thinking=true)  # Qwen3 thinking mode
BENCHMARKS=aime24=$EVAL_DIR/aime-2024.parquet,aime25=$EVAL_DIR/aime25.parquet,amc23=$EVAL_DIR/amc-23.parquet
EVAL_ARGS=(--set "evaluation.benchmarks=$BENCHMARKS" --set evaluation.k=32
  --set evaluation.interval=10 --set evaluation.at_start=true)  # authors: before training, every 10
CHECKPOINT_ARGS=(--out-dir "$OUT_DIR" --set checkpoint.interval=25 --set checkpoint.keep_last=2)

source "$SDPG_ROOT/examples/slurm/sdpg_job.sh"
