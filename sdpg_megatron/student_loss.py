"""The student pass's loss for one micro-batch: Megatron's `loss_func`.

`ModelPasses.train`'s forward step returns the policy's hidden states and a `StudentLoss`
for the micro-batch, as Megatron's own forward steps return `partial(loss_func, ...)`.
Called with the last stage's hidden states, it

- takes the states at the response positions and splits the micro-batch's tokens into
  the groups the fused kernel sees: all of them with the teacher's states, or, when the
  teacher ran for some samples only (`algo.teacher_sample_mask`), those with and those
  without (their KL is 0: gated off);
- per group, runs the fused vocab-parallel kernel: `vocab_parallel_token_loss`, which asks
  `token_loss` for each chunk's loss and takes its gradient in the forward
  (model.loss_mode=single_pass), or `vocab_parallel_token_stats` followed by `token_loss`
  on all the group's tokens at once (stats);
- in `token_loss`, computes each token's SDPG terms once (`algo.token_terms`): their sum
  is the loss, and the metrics are token sums of the same terms (`algo.metric_sums`),
  added up over chunks, groups, micro-batches and data-parallel ranks; with
  logging.term_pulls (two-pass only), also the squared norm of each term's gradient with
  respect to the hidden states (`PULL_TERMS`).

It returns Megatron's (loss, token count, reported sums) triple; the loss is the sum over
the micro-batch's tokens, Megatron divides by the step's token count
(`calculate_per_token_loss`, see model/training.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from sdpg_megatron.algo import metric_sums, token_terms
from sdpg_megatron.config import Config
from sdpg_megatron.experience import MicroBatch
from sdpg_megatron.model.provider import response_states
from sdpg_megatron.parallel import TokenStats, vocab_parallel_token_loss, vocab_parallel_token_stats

# Loss metrics reduced over micro-batches and data-parallel ranks (token-weighted means).
LOSS_METRICS = (
    "loss", "outcome_loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
    "opd_kl", "gate_frac", "anchor", "ref_kl_k3", "entropy", "tis_weight", "rollout_logprob_abs_diff",
)
# The loss terms whose pull logging.term_pulls reports (`algo.TokenTerms.parts`): each
# micro-batch reports "pull/<term>", the squared norm of the gradient of Σ_t term_t with
# respect to its last hidden states, which add up over micro-batches and ranks.
PULL_TERMS = ("outcome", "opd", "anchor", "entropy")


def takes_single_pass(config: Config) -> bool:
    """Whether the training loss takes its gradient in the forward (model.loss_mode)."""
    mode = config.model.loss_mode
    if mode == "auto":
        return torch.cuda.is_available() and config.model.params_dtype != "float32"
    return mode == "single_pass"


@dataclass(frozen=True)
class LossSettings:
    """What every micro-batch's loss of one PPO mini-batch shares."""

    config: Config
    group: dist.ProcessGroup | None  # the tensor-parallel group the vocabulary is sharded over
    vocab_size: int  # the real vocabulary (the output weight is padded past it)
    step: int  # rollout step k
    single_pass: bool
    gated_token_scale: float = 1.0  # algorithm.loss_tokens="gated": (all tokens) / (gated tokens)
    first_minibatch: bool = False  # report |log π_θ − log π_engine| (the weights the engines hold)


class StudentLoss:
    """The loss of micro-batch `mb` (see the module docstring).

    teacher: the micro-batch's `TeacherStates` (None: the teacher is off, or no token of
    this micro-batch needs it); reference: [N] log π_ref(y_t) or None; old: [N] log π_old
    (None: the engine's sampling log-probs). output_weight: returns the output layer's
    vocabulary shard (it exists on the last pipeline stage, where the loss is called)."""

    def __init__(self, settings: LossSettings, mb: MicroBatch, response_mask: torch.Tensor,
                 output_weight: Callable[[], torch.Tensor], *, teacher=None, teacher_ran: bool = False,
                 reference: torch.Tensor | None = None, old: torch.Tensor | None = None):
        self.settings, self.mb, self.response_mask, self.output_weight = settings, mb, response_mask, output_weight
        self.teacher = teacher
        # the KL term is in the loss when β_base > 0 and the step ran the teacher pass
        self.with_kl = settings.config.algorithm.beta_base > 0 and teacher_ran
        self.per_token = {  # the micro-batch's per-token inputs, indexed like its tokens
            "old_logprobs": mb.rollout_logprobs if old is None else old, "advantages": mb.advantages,
            "ref_logprobs": reference, "teacher_logprobs": None if teacher is None else teacher.logprobs,
            "rollout_logprobs": mb.rollout_logprobs,
        }
        self.sums: dict[str, torch.Tensor] = {}
        self._parts: dict[str, torch.Tensor] = {}  # the last token_loss call's terms, for term_pulls

    def __call__(self, hidden_states: torch.Tensor):
        """Megatron's loss_func: (Σ_t loss, token count, token sums of the metrics)."""
        mb = self.mb
        num_tokens = torch.tensor(mb.num_tokens, dtype=torch.int)
        if mb.num_tokens == 0:  # every response empty: nothing to learn, keep the graph
            return hidden_states.sum() * 0.0, num_tokens, {}
        states = response_states(hidden_states, self.response_mask)
        weight = self.output_weight()
        loss = sum(self._group_loss(states, weight, index, teacher_states) for index, teacher_states in self._groups(states))
        self.sums["loss"] = loss.detach()
        self.sums["tokens"] = torch.tensor(float(mb.num_tokens))
        return loss, num_tokens, self.sums

    def _groups(self, states: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(token index or None for all, the teacher's states for them or None)."""
        teacher = self.teacher
        if not self.with_kl or teacher is None:
            return [(None, None)]
        if teacher.rows is None:
            return [(None, teacher.states)]
        ran = torch.zeros(self.mb.num_tokens, dtype=torch.bool, device=states.device)
        ran[teacher.rows] = True
        return [(teacher.rows, teacher.states), ((~ran).nonzero().squeeze(1), None)]

    def _group_loss(self, states: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
                    teacher_states: torch.Tensor | None) -> torch.Tensor:
        """Σ over the tokens `index` of their loss, through the fused kernel."""
        s, model = self.settings, self.settings.config.model
        hidden = states if index is None else states[index]
        targets = self.mb.targets if index is None else self.mb.targets[index]
        token_loss = partial(self.token_loss, index, teacher_states is not None)
        common = dict(group=s.group, vocab_size=s.vocab_size, temperature=s.config.rollout.temperature,
                      backend=model.loss_backend)
        term_pulls = s.config.logging.term_pulls  # report each term's pull (PULL_TERMS)
        if s.single_pass:
            if term_pulls:
                raise ValueError("logging.term_pulls needs the statistics' autograd graph; the single-pass loss "
                                 "(model.loss_mode auto on a GPU in bf16) does not keep it: set model.loss_mode=stats")
            loss, _ = vocab_parallel_token_loss(hidden, weight, targets, teacher_states,
                                                token_loss=token_loss, fp32_grad_weight=model.loss_fp32_grad_weight,
                                                **common)
            return loss
        stats = vocab_parallel_token_stats(hidden, weight, targets, teacher_states, **common)
        loss = token_loss(stats, slice(None))
        if term_pulls:
            self._add_pulls(hidden)
        return loss

    def _add_pulls(self, hidden: torch.Tensor) -> None:
        """Adds ‖∂(Σ_t term_t) / ∂hidden‖² of each term of the last `token_loss` call to the
        sums (an autograd backward of the vocab-parallel loss each; every TP rank runs it)."""
        for name, part in self._parts.items():
            grad = None
            if part.requires_grad:  # not a constant (the KL of tokens without the teacher: 0)
                (grad,) = torch.autograd.grad(part.sum(), hidden, retain_graph=True, allow_unused=True)
            squared = torch.zeros((), dtype=torch.float64) if grad is None else grad.double().square().sum()
            self._accumulate({f"pull/{name}": squared.cpu()})

    def _accumulate(self, sums: dict[str, torch.Tensor]) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def token_loss(self, index: torch.Tensor | None, with_teacher: bool, stats: TokenStats,
                   rows: slice) -> torch.Tensor:
        """Σ of the SDPG terms of the tokens `index[rows]` (index None: the micro-batch's
        `rows`), given their statistics; adds their metric sums to `self.sums`."""
        s = self.settings
        picked = rows if index is None else index[rows]
        inputs = {name: None if values is None else values[picked] for name, values in self.per_token.items()}
        reverse_kl, computed = stats.reverse_kl, None
        if self.with_kl and not with_teacher:  # gated off: KL 0, and not among the tokens opd_kl averages
            reverse_kl = torch.zeros_like(stats.logprobs)
            computed = torch.zeros_like(stats.logprobs, dtype=torch.bool)
        terms = token_terms(logprobs=stats.logprobs, step=s.step, total_steps=s.config.schedule.total_steps,
                            config=s.config.algorithm, reverse_kl=reverse_kl, entropy=stats.entropy,
                            gated_token_scale=s.gated_token_scale, **inputs)
        sums = metric_sums(terms, logprobs=stats.logprobs, reverse_kl=reverse_kl, reverse_kl_mask=computed,
                           ref_logprobs=inputs["ref_logprobs"], entropy=stats.entropy)
        if s.first_minibatch:
            sums["rollout_logprob_abs_diff"] = (stats.logprobs.detach() - inputs["rollout_logprobs"]).abs().sum()
        self._accumulate(sums)
        self._parts = terms.parts
        return terms.per_token.sum()
