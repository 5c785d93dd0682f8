"""One typed configuration tree for the recipe.

Every method in docs/method.md's baseline table is a *setting* of one loss: the presets
(`presets.py`) are functions that return an `AlgorithmConfig`, never separate code paths. `validate()`
is the one place that checks a config and raises `ValueError` naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

AnchorKind = Literal["none", "urkl", "ufkl", "fkl", "rkl"]
GateKind = Literal["none", "positive_advantage"]
TeacherScope = Literal["needed", "all"]
BetaSchedule = Literal["warmup_decay", "constant"]
AdvantageReweighting = Literal["none", "rlsd", "opsd"]
OldLogprobs = Literal["recompute", "engine"]  # where log π_old of the PPO ratio comes from
TeacherWeights = Literal["policy", "reference"]  # whose weights read the privileged view
LossTokens = Literal["all", "gated"]  # the token-mean's denominator
RewardScheme = Literal["binary", "signed"]  # correct/wrong as 1/0 or +1/-1
LrWarmupUnit = Literal["rollout_step", "optimizer_step"]
WeightTransport = Literal["auto", "shm", "cuda_ipc", "gloo", "nccl"]  # trainer → engine wire of a weight push
Recompute = Literal["none", "selective", "full"]  # activation recomputation of the training pass
RolloutMode = Literal["sync", "one_step_off"]  # whether a step's generation overlaps the previous step's training


@dataclass(kw_only=True)
class AlgorithmConfig:
    """The SDPG loss and its baselines (docs/method.md, "Loss" and "Baselines")."""

    name: str = "sdpg-urkl"
    # Group-relative advantage.
    group_size: int = 8
    advantage_eps: float = 1e-6
    # Outcome (clipped policy-gradient) term.
    use_outcome: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 10.0  # None disables the dual clip for A < 0
    log_ratio_clamp: float = 20.0
    # log π_old of the ratio: "recompute" = the trainer's forward over the step's samples
    # before its first update (the authors'); "engine" = the engine's sampling log-probs
    # (saves that forward; right only when engine and trainer agree, see docs/method.md).
    old_logprobs: OldLogprobs = "recompute"
    # Truncated importance sampling: each token's outcome term × min(π_old/π_engine, C)
    # (needs old_logprobs="recompute"); None: off (the authors').
    tis_cap: float | None = None
    # Entropy bonus: − entropy_coef · H(p) per token (the authors' OPSD script: 0.01).
    entropy_coef: float = 0.0
    # On-policy distillation (exact full-vocabulary reverse KL to the detached teacher).
    beta_base: float = 1e-3
    beta_schedule: BetaSchedule = "warmup_decay"
    beta_warmup_steps: int = 50
    beta_decay_steps: int = 350
    gate: GateKind = "positive_advantage"
    # The authors' code clamps each token's OPD KL at this many nats (no gradient above);
    # None: unclamped. The paper presets use 20.
    opd_kl_clamp: float | None = None
    # Whose weights read the privileged view: the current policy (SDPG, RLSD, OPCD) or the
    # frozen reference π_ref (the authors' OPSD script).
    teacher_weights: TeacherWeights = "policy"
    # Denominator of the token-mean: every response token (docs/method.md), or only the tokens
    # of gated samples (A > 0; the authors' OPSD loss).
    loss_tokens: LossTokens = "all"
    # Which samples the teacher pass runs on: "needed" only those the loss uses it for
    # (A > 0 under the gate, none while β(k) = 0; every sample for RLSD), "all" every
    # sample, so that opd_kl is also reported over the gated-off tokens.
    teacher_scope: TeacherScope = "needed"
    # Reference-policy anchor on sampled tokens.
    anchor: AnchorKind = "urkl"
    alpha: float = 1e-3
    # k1 KL penalty folded into the reward (GRPO baseline); 0 disables it.
    kl_in_reward_coef: float = 0.0
    # Per-token advantage from the teacher: "rlsd" reweights A by the teacher/old-policy
    # ratio; "opsd" replaces it by clamp(log q(y_t) − log π_old(y_t), 0, 20) on A > 0.
    advantage_reweighting: AdvantageReweighting = "none"
    rlsd_lambda_base: float = 0.5
    rlsd_lambda_steps: int = 50
    rlsd_clip: float = 0.2

    @property
    def uses_teacher(self) -> bool:
        """Whether a teacher forward (privileged context) is needed at all."""
        return self.beta_base > 0 or self.advantage_reweighting != "none"

    @property
    def uses_reference(self) -> bool:
        """Whether the frozen reference policy is needed at all."""
        return ((self.anchor != "none" and self.alpha > 0) or self.kl_in_reward_coef > 0
                or (self.uses_teacher and self.teacher_weights == "reference"))


@dataclass(kw_only=True)
class ScheduleConfig:
    """Rollout steps and how each step's batch is cut (docs/method.md, "Defaults")."""

    total_steps: int = 400
    prompts_per_step: int = 128
    minibatches_per_step: int = 8  # PPO updates per rollout step (128 / 16 prompts)
    micro_batch_size: int = 4  # sequences per forward/backward micro-batch
    # Dynamic batching: micro-batches cut from length-sorted samples so that rows × own
    # padded length ≤ this many tokens, each padded only to its own longest row (replaces
    # micro_batch_size); None: micro_batch_size rows padded to the step's longest sequence.
    # Under pipeline parallelism the stages exchange each activation's shape first.
    max_tokens_per_micro_batch: int | None = None
    # THD packing (transformer-engine on CUDA only): each micro-batch's sequences run as one
    # row of concatenated sequences without padding (Megatron's PackedSeqParams), for the
    # policy's, the teacher's and π_ref's forward passes; the loss is unchanged.
    pack_sequences: bool = False
    seed: int = 0
    # DAPO dynamic sampling: drop groups whose answers are all right or all wrong and
    # generate more prompts (up to max_generation_batches batches of prompts_per_step)
    # until prompts_per_step informative groups fill the step; short of that, train on
    # whole PPO mini-batches of what there is.
    dynamic_sampling: bool = False
    max_generation_batches: int = 10


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW through Megatron's (distributed) optimizer, linear LR warm-up then constant."""

    lr: float = 1e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 10
    # What the warm-up counts: "rollout_step" = every PPO update of step k runs at
    # lr · min(1, (k − 1) / lr_warmup_steps) (the authors' scheduler, stepped once per
    # rollout step); "optimizer_step" = update j runs at lr · min(1, j / lr_warmup_steps).
    lr_warmup_unit: LrWarmupUnit = "rollout_step"
    use_distributed_optimizer: bool = True


@dataclass(kw_only=True)
class ModelConfig:
    """The policy's starting point: a Hugging Face Qwen3 directory (config, safetensors,
    tokenizer); the engines load it too, then take every weight push. With `mcore_dir`
    the trainer (policy and π_ref) reads its initial weights from that Megatron checkpoint
    (tools/hf_to_mcore.py's output) instead of the safetensors: each rank reads only its
    shards. A run that has its own checkpoints resumes from those and ignores both."""

    hf_dir: str = ""
    mcore_dir: str | None = None
    tokenizer_dir: str | None = None  # None: hf_dir
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    # The fused loss's per-rank body: "auto" = Triton kernels for bf16 on a GPU, the chunked
    # torch loop otherwise (a GPU without Triton warns once, ~6x slower); "torch" forces the
    # loop; "triton" refuses to run without the kernels (parallel/vocab_parallel.py).
    loss_backend: Literal["auto", "torch", "triton"] = "auto"
    # How the loss gets its gradient: "stats" = per-token statistics, then autograd (6 GEMMs of
    # (N, H, V/tp) with a teacher); "single_pass" = in the forward, chunk by chunk (4 GEMMs:
    # `vocab_parallel_token_loss`); "auto" = single_pass for bf16/fp16 on a GPU, stats otherwise.
    loss_mode: Literal["auto", "stats", "single_pass"] = "auto"
    # single_pass only: the output layer's ∂W accumulated in fp32 (+4·V/tp·H bytes), not its dtype.
    loss_fp32_grad_weight: bool = False


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Megatron's sequence parallelism: the norms, residuals and dropout between the TP
    # regions hold s/tp of each sequence per rank (needs tensor_parallel > 1).
    sequence_parallel: bool = False
    # Activation recomputation in the policy's training pass (Megatron's --recompute-*):
    # "full" keeps only the input of each unit of layers and re-runs the unit in backward:
    # with "uniform" every recompute_num_layers layers form a unit, with "block" only the
    # first recompute_num_layers layers of each pipeline stage are recomputed, one at a time.
    # "selective" recomputes core attention only (saves memory only with unfused attention).
    recompute_granularity: Recompute = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1
    # Mixture-of-experts: experts over expert_parallel ranks, each one's FFN over expert_tensor_parallel.
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1


@dataclass(kw_only=True)
class DataConfig:
    train_files: tuple[str, ...] = ()  # DAPO-Math-17k-schema parquet files
    max_prompt_tokens: int = 2048
    privileged: Literal["answer", "answer+solution"] = "answer"  # the teacher's context
    privileged_from: Literal["own", "other"] = "own"  # "other": the next problem's context, a control
    # Qwen3's chat template with enable_thinking=True (the authors'): responses think first,
    # the answer follows "</think>". A template without the switch ignores it.
    enable_thinking: bool = True


@dataclass(kw_only=True)
class RolloutConfig:
    """The vLLM fleet and its sampling (docs/method.md: T = 1, top_p 1, top_k disabled)."""

    num_engines: int = 1
    engine_tensor_parallel: int = 1
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0  # set to engine_tensor_parallel on GPU clusters
    max_response_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    dtype: str = "float32"  # the engines' dtype; pushes are cast to it
    max_num_seqs: int = 256
    kv_cache_bytes: int | None = 256 * 2**20  # explicit KV cache (CPU); None: gpu_memory_utilization
    gpu_memory_utilization: float = 0.5
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND for CPU engines
    request_timeout_s: float = 600.0
    max_restarts: int = 2
    bucket_bytes: int = 256 * 2**20  # weight-push bucket size: a trainer rank's peak extra memory
    # "auto": engines on the trainer's node read pushes from shared memory, others get them over
    # gloo; "shm" / "cuda_ipc": same node only; "gloo" (CPU or GPU engines), "nccl" (GPU engines)
    weight_transport: WeightTransport = "auto"
    weight_sync_timeout_s: float = 300.0  # joining a weight group; each bucket's broadcast
    ray_address: str | None = None  # None: a local Ray instance; "auto" or host:port on Slurm
    # "sync": step k's batch is generated from the weights trained through step k − 1, then
    # trained on (the paper's). "one_step_off": step k + 1's batch (dynamic sampling's
    # refills included) is generated while step k trains, from the weights one step behind
    # the trainer's; needs algorithm.old_logprobs=recompute and algorithm.tis_cap
    # (docs/rollout.md, "One step off").
    mode: RolloutMode = "sync"


@dataclass(kw_only=True)
class RewardConfig:
    num_workers: int = 4
    timeout_s: float = 5.0  # hard wall-clock limit per math-verify call
    overlong_buffer: int | None = 512  # None disables the overlong penalty
    # "signed": +1 right, −1 wrong (the authors'); "binary": 1 / 0. Both add the penalty.
    scheme: RewardScheme = "signed"
    # The answer is the last \boxed{} within this many characters at the end of the response
    # (after "</think>" in thinking mode); the authors read the last 500.
    answer_tail_chars: int = 500


@dataclass(kw_only=True)
class EvaluationConfig:
    """pass@1 mean@k on held-out benchmarks through the fleet (docs/method.md, "Evaluation")."""

    benchmarks: tuple[str, ...] = ()  # "name=path.parquet", e.g. "aime24=data/eval/aime-2024.parquet"
    interval: int = 0  # steps between evaluations (and after the last step); 0 disables
    at_start: bool = True  # also before the first step (step 0), when interval > 0
    k: int = 32
    max_response_tokens: int | None = None  # None: rollout.max_response_tokens


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = 50  # steps; 0 saves only at the end
    keep_last: int = 2
    dir: str | None = None  # None: <out_dir>/checkpoints


@dataclass(kw_only=True)
class LoggingConfig:
    out_dir: str = "runs/sdpg"
    tensorboard: bool = True
    progress: bool = True
    # Weights & Biases beside TensorBoard (the `wandb` package): "offline" writes the run under
    # out_dir/wandb/ with no network (`wandb sync` uploads it later), "online" streams it.
    wandb: bool = False
    wandb_project: str = "sdpg"
    wandb_mode: Literal["offline", "online"] = "offline"
    # pull/<term>: each loss term's gradient norm w.r.t. the last hidden states, for sizing β_base
    # (docs/configuration.md); an extra loss backward per term, and not with the single-pass loss
    term_pulls: bool = False


@dataclass(kw_only=True)
class Config:
    """Root of the tree: one section per concern, each validated by `validate`."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- building a tree


def config_to_dict(config: Config) -> dict:
    return asdict(config)


def config_from_dict(values: dict) -> Config:
    """The inverse of `config_to_dict`; unknown keys are errors that name them."""
    config = Config()
    for section_name, section_values in values.items():
        section = _section(config, section_name)
        for key, value in section_values.items():
            _set_field(section, section_name, key, value)
    return config


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings (the CLI's --set), parsed by the field's type."""
    for item in overrides:
        path, sep, text = item.partition("=")
        section_name, dot, key = path.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r}: write it as section.field=value, e.g. schedule.total_steps=100")
        section = _section(config, section_name)
        _set_field(section, section_name, key, _parse_value(section, section_name, key, text.strip()))
    return config


def _section(config: Config, name: str):
    names = [f.name for f in fields(Config)]
    if name not in names:
        raise ValueError(f"config section {name!r} is unknown; sections are {names}")
    return getattr(config, name)


def _set_field(section, section_name: str, key: str, value) -> None:
    names = [f.name for f in fields(section)]
    if key not in names:
        raise ValueError(f"config field {section_name}.{key} is unknown; {section_name} has {names}")
    if isinstance(value, list):
        value = tuple(value)
    setattr(section, key, value)


def _parse_value(section, section_name: str, key: str, text: str):
    hints = get_type_hints(type(section))
    if key not in hints:
        raise ValueError(f"config field {section_name}.{key} is unknown; {section_name} has {sorted(hints)}")
    hint = hints[key]
    allowed = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if type(None) in allowed and text.lower() in ("none", "null"):
        return None
    for kind in allowed:
        if kind is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        if kind is str or get_origin(kind) is Literal:
            return text
        if get_origin(kind) is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
    raise ValueError(f"config field {section_name}.{key}: cannot read {text!r} as {hint}")


# --------------------------------------------------------------------------- validation


def validate(config):
    """Check a config (or one section) and return it; raise ValueError naming the field."""
    if isinstance(config, Config):
        for section in fields(config):
            validate(getattr(config, section.name))
        _validate_tree(config)
    elif type(config) in _SECTION_CHECKS:
        _SECTION_CHECKS[type(config)](config)
    else:
        raise TypeError(f"cannot validate {type(config).__name__}")
    return config


def _require(condition: bool, field_name: str, fix: str) -> None:
    if not condition:
        raise ValueError(f"config field {field_name}: {fix}")


def _validate_algorithm(c: AlgorithmConfig) -> None:
    p = "algorithm."
    _require(c.group_size >= 1, p + "group_size", f"must be >= 1, got {c.group_size}")
    _require(c.advantage_eps > 0, p + "advantage_eps", "must be > 0")
    _require(0 <= c.clip_low < 1, p + "clip_low", f"must be in [0, 1), got {c.clip_low}")
    _require(c.clip_high >= 0, p + "clip_high", f"must be >= 0, got {c.clip_high}")
    _require(
        c.dual_clip is None or c.dual_clip > 1, p + "dual_clip",
        f"must be > 1 or None (disabled), got {c.dual_clip}",
    )
    _require(c.log_ratio_clamp > 0, p + "log_ratio_clamp", "must be > 0")
    _require(c.beta_base >= 0, p + "beta_base", f"must be >= 0, got {c.beta_base}")
    _require(
        c.beta_schedule in ("warmup_decay", "constant"), p + "beta_schedule",
        f"must be 'warmup_decay' or 'constant', got {c.beta_schedule!r}",
    )
    _require(c.beta_warmup_steps >= 0, p + "beta_warmup_steps", "must be >= 0")
    _require(c.beta_decay_steps >= 0, p + "beta_decay_steps", "must be >= 0")
    _require(
        c.gate in ("none", "positive_advantage"), p + "gate",
        f"must be 'none' or 'positive_advantage', got {c.gate!r}",
    )
    _require(
        c.teacher_scope in ("needed", "all"), p + "teacher_scope",
        f"must be 'needed' or 'all', got {c.teacher_scope!r}",
    )
    _require(
        c.anchor in ("none", "urkl", "ufkl", "fkl", "rkl"), p + "anchor",
        f"must be one of none/urkl/ufkl/fkl/rkl, got {c.anchor!r}",
    )
    _require(c.alpha >= 0, p + "alpha", f"must be >= 0, got {c.alpha}")
    _require(c.kl_in_reward_coef >= 0, p + "kl_in_reward_coef", "must be >= 0")
    _require(
        c.advantage_reweighting in get_args(AdvantageReweighting), p + "advantage_reweighting",
        f"must be one of {get_args(AdvantageReweighting)}, got {c.advantage_reweighting!r}",
    )
    _require(c.old_logprobs in get_args(OldLogprobs), p + "old_logprobs",
             f"must be 'recompute' or 'engine', got {c.old_logprobs!r}")
    _require(c.tis_cap is None or c.tis_cap > 0, p + "tis_cap", f"must be > 0 or None (off), got {c.tis_cap}")
    _require(c.tis_cap is None or c.old_logprobs == "recompute", p + "tis_cap",
             "corrects the engine's samples towards the trainer's recomputed π_old: with "
             "old_logprobs='engine' the ratio is already taken against the engine, so a weight would count it "
             "twice; set algorithm.old_logprobs=recompute or tis_cap=none")
    _require(c.entropy_coef >= 0, p + "entropy_coef", f"must be >= 0, got {c.entropy_coef}")
    _require(c.opd_kl_clamp is None or c.opd_kl_clamp > 0, p + "opd_kl_clamp", "must be > 0 or None (unclamped)")
    _require(c.teacher_weights in get_args(TeacherWeights), p + "teacher_weights",
             f"must be 'policy' or 'reference', got {c.teacher_weights!r}")
    _require(c.teacher_weights == "policy" or c.beta_base == 0, p + "teacher_weights",
             "the OPD term distils from the current policy (β_base > 0 needs teacher_weights='policy')")
    _require(c.loss_tokens in get_args(LossTokens), p + "loss_tokens", f"must be 'all' or 'gated', got {c.loss_tokens!r}")
    _require(c.loss_tokens == "all" or c.gate == "positive_advantage", p + "loss_tokens",
             "'gated' averages over the tokens of samples with A > 0: set algorithm.gate=positive_advantage")
    _require(c.advantage_reweighting != "opsd" or c.use_outcome, p + "advantage_reweighting",
             "'opsd' weights the outcome term: set algorithm.use_outcome=true")
    _require(0 <= c.rlsd_lambda_base <= 1, p + "rlsd_lambda_base", "must be in [0, 1]")
    _require(c.rlsd_lambda_steps >= 1, p + "rlsd_lambda_steps", "must be >= 1")
    _require(0 <= c.rlsd_clip < 1, p + "rlsd_clip", "must be in [0, 1)")
    _require(
        c.use_outcome or c.beta_base > 0 or (c.anchor != "none" and c.alpha > 0),
        p + "use_outcome",
        "the loss has no term: enable use_outcome, set beta_base > 0 or choose an anchor with alpha > 0",
    )



def _validate_schedule(c: ScheduleConfig) -> None:
    p = "schedule."
    _require(c.total_steps >= 1, p + "total_steps", "must be >= 1")
    _require(c.prompts_per_step >= 1, p + "prompts_per_step", "must be >= 1")
    _require(c.minibatches_per_step >= 1, p + "minibatches_per_step", "must be >= 1")
    _require(
        c.prompts_per_step % c.minibatches_per_step == 0, p + "minibatches_per_step",
        f"must divide prompts_per_step={c.prompts_per_step}, got {c.minibatches_per_step}",
    )
    _require(c.micro_batch_size >= 1, p + "micro_batch_size", "must be >= 1")
    _require(c.max_generation_batches >= 1, p + "max_generation_batches", f"must be >= 1, got {c.max_generation_batches}")
    _require(c.max_tokens_per_micro_batch is None or c.max_tokens_per_micro_batch >= 8, p + "max_tokens_per_micro_batch",
             f"must be >= 8 tokens or None (fixed micro_batch_size), got {c.max_tokens_per_micro_batch}")
    _require(isinstance(c.pack_sequences, bool), p + "pack_sequences", "must be true or false")


def _validate_optimizer(c: OptimizerConfig) -> None:
    p = "optimizer."
    _require(c.lr > 0, p + "lr", f"must be > 0, got {c.lr}")
    _require(c.weight_decay >= 0, p + "weight_decay", "must be >= 0")
    _require(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, p + "adam_beta1/adam_beta2", "must be in [0, 1)")
    _require(c.clip_grad >= 0, p + "clip_grad", "must be >= 0 (0 disables clipping)")
    _require(c.lr_warmup_steps >= 0, p + "lr_warmup_steps", "must be >= 0")
    _require(c.lr_warmup_unit in get_args(LrWarmupUnit), p + "lr_warmup_unit",
             f"must be 'rollout_step' or 'optimizer_step', got {c.lr_warmup_unit!r}")


def _validate_model(c: ModelConfig) -> None:
    _require(bool(c.hf_dir), "model.hf_dir", "set it to a Hugging Face Qwen3 directory (config.json + safetensors)")
    _require(c.params_dtype in ("float32", "bfloat16"), "model.params_dtype", "must be 'float32' or 'bfloat16'")
    _require(c.loss_backend in ("auto", "torch", "triton"), "model.loss_backend", "must be 'auto', 'torch' or 'triton'")
    _require(c.loss_mode in ("auto", "stats", "single_pass"), "model.loss_mode",
             "must be 'auto', 'stats' or 'single_pass'")
    _require(isinstance(c.loss_fp32_grad_weight, bool), "model.loss_fp32_grad_weight", "must be true or false")


def _validate_parallel(c: ParallelConfig) -> None:
    _require(c.tensor_parallel >= 1, "parallel.tensor_parallel", "must be >= 1")
    _require(c.pipeline_parallel >= 1, "parallel.pipeline_parallel", "must be >= 1")
    _require(c.expert_parallel >= 1, "parallel.expert_parallel", "must be >= 1")
    _require(c.expert_tensor_parallel >= 1, "parallel.expert_tensor_parallel", "must be >= 1")
    _require(not c.sequence_parallel or c.tensor_parallel > 1, "parallel.sequence_parallel",
             "needs tensor parallelism: set parallel.tensor_parallel > 1 (--tp) or turn it off")
    _require(c.recompute_granularity in get_args(Recompute), "parallel.recompute_granularity",
             f"must be one of {get_args(Recompute)}, got {c.recompute_granularity!r}")
    _require(c.recompute_method in ("uniform", "block"), "parallel.recompute_method",
             f"must be 'uniform' or 'block', got {c.recompute_method!r}")
    _require(c.recompute_num_layers >= 1, "parallel.recompute_num_layers", f"must be >= 1, got {c.recompute_num_layers}")


def _validate_data(c: DataConfig) -> None:
    _require(len(c.train_files) > 0, "data.train_files", "name at least one DAPO-schema parquet file")
    _require(c.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    _require(c.privileged in ("answer", "answer+solution"), "data.privileged", "must be 'answer' or 'answer+solution'")
    _require(c.privileged_from in ("own", "other"), "data.privileged_from", "must be 'own' or 'other'")


def _validate_rollout(c: RolloutConfig) -> None:
    p = "rollout."
    _require(c.num_engines >= 1, p + "num_engines", "must be >= 1")
    _require(c.engine_tensor_parallel >= 1, p + "engine_tensor_parallel", "must be >= 1")
    _require(not c.gpus_per_engine or c.gpus_per_engine >= c.engine_tensor_parallel, p + "gpus_per_engine",
             f"an engine's {c.engine_tensor_parallel} TP workers need one GPU each: "
             f"set it to {c.engine_tensor_parallel} (or 0 for CPU engines)")
    _require(c.max_response_tokens >= 1, p + "max_response_tokens", "must be >= 1")
    _require(c.temperature > 0, p + "temperature", "must be > 0 (the loss uses the sampling temperature)")
    _require(0 < c.top_p <= 1, p + "top_p", "must be in (0, 1]")
    _require(c.bucket_bytes >= 2**20, p + "bucket_bytes", "must be >= 1 MiB")
    _require(c.request_timeout_s > 0, p + "request_timeout_s", "must be > 0")
    _require(c.weight_transport in get_args(WeightTransport), p + "weight_transport",
             f"must be one of {get_args(WeightTransport)}, got {c.weight_transport!r}")
    _require(c.weight_transport not in ("nccl", "cuda_ipc") or c.gpus_per_engine > 0, p + "weight_transport",
             f"{c.weight_transport!r} needs GPU engines (rollout.gpus_per_engine > 0); use 'auto' on CPU")
    _require(c.weight_sync_timeout_s > 0, p + "weight_sync_timeout_s", "must be > 0")
    _require(c.mode in get_args(RolloutMode), p + "mode", f"must be 'sync' or 'one_step_off', got {c.mode!r}")


def _validate_reward(c: RewardConfig) -> None:
    _require(c.num_workers >= 1, "reward.num_workers", "must be >= 1")
    _require(c.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _require(c.overlong_buffer is None or c.overlong_buffer >= 1, "reward.overlong_buffer", "must be >= 1 or None")
    _require(c.scheme in get_args(RewardScheme), "reward.scheme", f"must be 'signed' or 'binary', got {c.scheme!r}")
    _require(c.answer_tail_chars >= 1, "reward.answer_tail_chars", f"must be >= 1, got {c.answer_tail_chars}")


def _validate_evaluation(c: EvaluationConfig) -> None:
    p = "evaluation."
    _require(c.interval >= 0, p + "interval", "must be >= 0 (0 disables evaluation)")
    _require(c.k >= 1, p + "k", f"must be >= 1, got {c.k}")
    _require(c.max_response_tokens is None or c.max_response_tokens >= 1, p + "max_response_tokens", "must be >= 1 or None")
    _require(not c.interval or bool(c.benchmarks), p + "benchmarks", "name at least one name=path.parquet when interval > 0")
    for spec in c.benchmarks:
        name, sep, path = spec.partition("=")
        _require(bool(sep and name and path), p + "benchmarks", f"write {spec!r} as name=path.parquet")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _require(c.interval >= 0, "checkpoint.interval", "must be >= 0")
    _require(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


def _validate_logging(c: LoggingConfig) -> None:
    _require(bool(c.out_dir), "logging.out_dir", "must name a directory")
    _require(c.wandb_mode in ("offline", "online"), "logging.wandb_mode",
             f"must be 'offline' or 'online', got {c.wandb_mode!r}")
    if c.wandb:
        import importlib.util
        import sys

        _require(bool(c.wandb_project), "logging.wandb_project", "must name a W&B project when logging.wandb=true")
        _require(importlib.util.find_spec("wandb") is not None, "logging.wandb",
                 f"the wandb package is not installed for {sys.executable}: pip install wandb==0.31.0 (what "
                 f"requirements/cpu.txt pins), or set logging.wandb=false")


def _validate_tree(c: Config) -> None:
    """Checks that span sections."""
    _validate_rollout_mode(c)
    _require(not c.logging.term_pulls or c.model.loss_mode != "single_pass", "logging.term_pulls", "needs the "
             "statistics' autograd graph, which the single-pass loss does not keep: set model.loss_mode=stats")
    # transformer-engine runs THD attention only in its flash / cuDNN kernels (bf16/fp16);
    # that TE and CUDA are there is checked where the model is built (ModelPasses)
    _require(not c.schedule.pack_sequences or c.model.params_dtype == "bfloat16", "schedule.pack_sequences",
             "packed (THD) sequences need model.params_dtype=bfloat16 (transformer-engine's fused attention): "
             "set it, or set schedule.pack_sequences=false")
    if c.reward.overlong_buffer is not None:
        _require(
            c.reward.overlong_buffer <= c.rollout.max_response_tokens, "reward.overlong_buffer",
            f"must be <= rollout.max_response_tokens={c.rollout.max_response_tokens}",
        )


def _validate_rollout_mode(c: Config) -> None:
    """one_step_off trains on samples drawn from the weights one step behind the trainer's."""
    if c.rollout.mode != "one_step_off":
        return
    _require(c.algorithm.old_logprobs == "recompute", "rollout.mode / algorithm.old_logprobs",
             "rollout.mode=one_step_off samples from the weights one step behind the trainer's, so the engine's "
             "log-probs are not π_old: set algorithm.old_logprobs=recompute, or rollout.mode=sync")
    # Refused rather than defaulted: the loss changes with the cap, so the run's config states it.
    _require(c.algorithm.tis_cap is not None or not c.algorithm.use_outcome, "rollout.mode / algorithm.tis_cap",
             "rollout.mode=one_step_off samples from the weights one step behind the trainer's: set "
             "algorithm.tis_cap (2.0 is verl's cap) to importance-correct the outcome term, or rollout.mode=sync")


_SECTION_CHECKS = {
    AlgorithmConfig: _validate_algorithm,
    ScheduleConfig: _validate_schedule,
    OptimizerConfig: _validate_optimizer,
    ModelConfig: _validate_model,
    ParallelConfig: _validate_parallel,
    DataConfig: _validate_data,
    RolloutConfig: _validate_rollout,
    RewardConfig: _validate_reward,
    EvaluationConfig: _validate_evaluation,
    CheckpointConfig: _validate_checkpoint,
    LoggingConfig: _validate_logging,
}
