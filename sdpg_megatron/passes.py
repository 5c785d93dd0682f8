"""The model passes of a step, through Megatron's pipeline schedule on every rank.

- π_old: the policy before the step's updates, log-probs of the sampled tokens (forward
  only; the PPO ratio's denominator, algorithm.old_logprobs="recompute");
- reference: frozen π_ref, log-probs of the sampled tokens (forward only);
- teacher: the current policy (or π_ref, algorithm.teacher_weights) on the
  privileged-context view, final hidden states at the response positions (forward only,
  detached — docs/method.md: no gradient through q at all);
- student: the policy with gradients; each micro-batch's `StudentLoss` (student_loss.py)
  turns its hidden states, the teacher's and the output-weight shard into per-token
  log-prob, entropy and exact full-vocabulary KL with the fused vocab-parallel kernel, and
  those into the SDPG loss and its metrics.

Per-token results live on the last pipeline stage, one tensor per micro-batch, in the
micro-batch's flat token order. Micro-batches of different shapes (dynamic batching, THD
packing) run under pipeline parallelism with Megatron's `variable_seq_lengths`: each stage
sends the activation's shape before the activation. With `schedule.pack_sequences` every
pass runs a micro-batch as one packed row (`packing.py`); the response mask of the packed
row selects the same tokens in the same order, so nothing downstream changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from sdpg_megatron.config import Config
from sdpg_megatron.experience import MicroBatch, StepBatch, micro_batches
from sdpg_megatron.model.convert import check_mcore_source, load_mcore_weights
from sdpg_megatron.model.hf_mapping import load_hf_weights
from sdpg_megatron.model.provider import response_states, transformer_engine_available
from sdpg_megatron.model.training import StepResult, build_frozen, build_policy, forward_only, train_step
from sdpg_megatron.packing import pack_view, packing_multiples
from sdpg_megatron.parallel import TokenStats, padded_vocab_size, vocab_parallel_token_stats
from sdpg_megatron.parallel.groups import ParallelGroups
from sdpg_megatron.rollout.routing import RoutingMismatchMeter, recorded_routing
from sdpg_megatron.student_loss import LOSS_METRICS, PULL_TERMS, LossSettings, StudentLoss, takes_single_pass


@dataclass
class TeacherStates:
    """The teacher pass's result for one student micro-batch (last pipeline stage)."""

    states: torch.Tensor  # [n, H] detached final hidden states at the response positions
    logprobs: torch.Tensor | None  # [n] log q(y_t), for RLSD
    rows: torch.Tensor | None = None  # [n] the micro-batch's token rows they are for; None: all


@dataclass
class ModelInput:
    """One view of a micro-batch as the model takes it: padded rows [b, S], or one packed
    row [1, L] with its `PackedSeqParams` (THD)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    response_mask: torch.Tensor  # True where the position predicts a response token
    packed_seq_params: PackedSeqParams | None = None


def _collect_states(outputs: list, collect: Callable, output_weight: Callable[[], torch.Tensor],
                    response_mask: torch.Tensor, mb: MicroBatch, hidden_states: torch.Tensor):
    """A forward-only pass's loss_func: `collect` the states at the response positions into
    `outputs`; the loss is a zero that keeps the graph."""
    states = response_states(hidden_states, response_mask)
    outputs.append(collect(states, output_weight(), mb))
    return hidden_states.sum() * 0.0, {}


class ModelPasses:
    def __init__(self, config: Config, groups: ParallelGroups, source, *, arch=None):
        """source: the `HFCheckpoint` the policy (and π_ref) start from; None starts both
        from Megatron's random initialisation of `arch` (benchmarks)."""
        if config.schedule.pack_sequences and not transformer_engine_available():
            raise ValueError(
                "config field schedule.pack_sequences: packed (THD) sequences need transformer-engine on a CUDA GPU "
                "(Megatron's local attention has no THD path); install the gpu extra on a GPU machine, or set "
                "schedule.pack_sequences=false")
        self.config, self.groups = config, groups
        # micro-batches of different shapes: the pipeline stages exchange shapes first
        self.variable_shapes = config.schedule.max_tokens_per_micro_batch is not None or config.schedule.pack_sequences
        self.arch = source.arch if source is not None else arch
        if self.arch is None:
            raise ValueError("ModelPasses needs a source checkpoint or, for a random initialisation, arch=")
        dtype = getattr(torch, config.model.params_dtype)
        padded = padded_vocab_size(self.arch.vocab_size, groups.tp_size)

        def load(module):
            if source is None:
                return
            if config.model.mcore_dir:
                load_mcore_weights(module, config.model.mcore_dir)
            else:
                load_hf_weights(module, self.arch, source.read, padded_vocab=padded, tp_size=groups.tp_size,
                                tp_rank=groups.tp_rank, pp_size=groups.pp_size, pp_rank=groups.pp_rank,
                                ep_size=groups.ep_size, ep_rank=groups.ep_rank, etp_size=groups.etp_size,
                                etp_rank=groups.etp_rank)

        if config.model.mcore_dir:
            check_mcore_source(config.model.mcore_dir, self.arch, padded, tp=groups.tp_size)

        self.policy = build_policy(self.arch, groups, config.optimizer, params_dtype=dtype, load_weights=load,
                                   parallel=config.parallel, variable_seq_lengths=self.variable_shapes)
        uses_reference = config.algorithm.uses_reference
        self.reference = build_frozen(self.arch, groups, params_dtype=dtype, load_weights=load, parallel=config.parallel,
                                      variable_seq_lengths=self.variable_shapes) if uses_reference else None

    # ------------------------------------------------------------------ plumbing

    def _model_input(self, mb: MicroBatch, view: str) -> ModelInput:
        """The "student" or "teacher" view of `mb`, packed under schedule.pack_sequences."""
        teacher = view == "teacher"
        tokens = mb.teacher_tokens if teacher else mb.tokens
        positions = mb.teacher_positions if teacher else mb.positions
        mask = mb.teacher_response_mask if teacher else mb.response_mask
        if not self.config.schedule.pack_sequences:
            return ModelInput(tokens, positions, mask)
        sequence_multiple, row_multiple = packing_multiples(
            tensor_parallel=self.groups.tp_size, sequence_parallel=self.config.parallel.sequence_parallel)
        packed = pack_view(tokens, mask, (mb.teacher_lengths if teacher else mb.lengths).tolist(),
                           sequence_multiple=sequence_multiple, row_multiple=row_multiple)
        # Padding runs as tokens of the sequence it follows: causal attention keeps it out of
        # every real token's context, and every position gets a defined output (a kernel may
        # leave positions outside cu_seqlens unwritten; 0 · NaN would reach the weight gradients).
        slots = packed.layout.cu_seqlens_padded.to(tokens.device)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=slots, cu_seqlens_kv=slots, cu_seqlens_q_padded=slots,
                                 cu_seqlens_kv_padded=slots, max_seqlen_q=packed.layout.max_seqlen,
                                 max_seqlen_kv=packed.layout.max_seqlen)
        return ModelInput(packed.tokens, packed.positions, packed.response_mask, params)

    def _stats(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher=None) -> TokenStats:
        return vocab_parallel_token_stats(
            hidden, weight, targets, teacher, group=self.groups.loss_tp_group,
            vocab_size=self.arch.vocab_size, temperature=self.config.rollout.temperature,
            backend=self.config.model.loss_backend,
        )

    @property
    def _experts_across_replicas(self) -> bool:
        """Whether experts are split over ranks of different data-parallel replicas (EP > 1):
        then every forward's all-to-all token dispatch needs all of them, so every rank of
        the data-parallel group must run as many micro-batches in each pass."""
        return self.arch.is_moe and self.groups.ep_size > 1

    def _micro_batch_counts(self, count: int) -> tuple[int, int]:
        """(fewest, most) micro-batches any data-parallel rank has for a pass (collective
        when experts are split across replicas; (count, count) otherwise)."""
        if not self._experts_across_replicas:
            return count, count
        counts = torch.tensor([count, -count], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self.groups.dp_group)
        return -int(counts[1]), int(counts[0])

    def _forward_only(self, model, batch: StepBatch, mbs: list[MicroBatch], view: str,
                      collect: Callable[[torch.Tensor, torch.Tensor, MicroBatch], torch.Tensor], *,
                      filler: list[MicroBatch] | None = None) -> list[torch.Tensor]:
        """Runs `model` forward-only on one view of `mbs`; on the last stage `collect(hidden
        states at the response positions, output weight, micro-batch)` per micro-batch.

        With experts split across data-parallel replicas a rank with fewer micro-batches
        than another runs repeats of its last one (or of `filler`'s) whose outputs are
        dropped, so that the replicas' all-to-alls pair up."""
        _, most = self._micro_batch_counts(len(mbs))
        real = len(mbs)
        mbs = mbs + [(mbs or filler)[-1]] * (most - real) if most > real else mbs
        if not mbs:
            return []
        module = getattr(model, "module", model)
        outputs: list[torch.Tensor] = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            inputs = self._model_input(mb, view)
            hidden = model(inputs.tokens, inputs.positions, None, packed_seq_params=inputs.packed_seq_params,
                           return_hidden=True)
            return hidden, partial(_collect_states, outputs, collect, module.output_weight, inputs.response_mask, mb)

        length = batch.teacher_length if view == "teacher" else batch.student_length
        forward_only(model, forward_step, iter(mbs), num_microbatches=len(mbs), seq_length=length,
                     micro_batch_size=mbs[0].tokens.shape[0])
        return outputs[:real]

    # ------------------------------------------------------------------ passes

    def reference_logprobs(self, batch: StepBatch, mbs: list[MicroBatch]) -> list[torch.Tensor]:
        """[N] log π_ref(y_t) per micro-batch (last stage; empty list elsewhere)."""
        return self._forward_only(self.reference, batch, mbs, "student",
                                  lambda states, weight, mb: self._stats(states, weight, mb.targets).logprobs)

    def old_logprobs(self, batch: StepBatch, mbs: list[MicroBatch],
                     routing: RoutingMismatchMeter | None = None) -> list[torch.Tensor]:
        """[N] log π_old(y_t) per micro-batch: the policy's own forward before the step's
        first update (last stage; empty list elsewhere). With `routing` (mixture-of-experts
        models whose samples carry the engine's routed experts) the forward's routing of the
        response tokens is recorded and compared with the engine's, on every rank."""
        def collect(states, weight, mb):
            return self._stats(states, weight.detach(), mb.targets).logprobs

        if routing is None:
            return self._forward_only(self.policy.model, batch, mbs, "student", collect)
        with recorded_routing(self.policy.model) as record:
            old = self._forward_only(self.policy.model, batch, mbs, "student", collect)
        engine = [sample.rollout_routed_experts for sample in batch.samples]
        sp_group = self.groups.tp_group if self.config.parallel.sequence_parallel else None
        for mb, forward in zip(mbs, record.take()):
            routing.add_micro_batch(forward, self._model_input(mb, "student").response_mask, engine, mb.sample_ids,
                                    record.layers, sequence_parallel_group=sp_group)
        return old

    def mismatch_metrics(self, shapes: list[list[MicroBatch]], old: list[list[torch.Tensor]]) -> dict[str, float]:
        """Engine vs trainer on the sampled tokens, over the whole step (every rank gets it):
        mean |log π_old − log π_engine| and the k3 estimate of KL(π_engine ‖ π_old)
        (E[r − 1 − log r], r = π_old / π_engine, which is ≥ 0 per token)."""
        sums = torch.zeros(3, dtype=torch.float64)
        if self._contributes():
            for mbs, values in zip(shapes, old):
                for mb, trainer in zip(mbs, values):
                    log_ratio = (trainer.detach() - mb.rollout_logprobs).double().cpu()
                    sums += torch.stack([log_ratio.abs().sum(), (log_ratio.exp() - 1 - log_ratio).sum(),
                                         torch.tensor(float(log_ratio.numel()), dtype=torch.float64)])
        dist.all_reduce(sums)
        tokens = sums[2].clamp_min(1.0)
        return {"mismatch/logprob_abs_diff": (sums[0] / tokens).item(), "mismatch/kl_k3": (sums[1] / tokens).item()}

    def teacher_states(self, batch: StepBatch, mbs: list[MicroBatch],
                       needed: torch.Tensor | None = None) -> list[TeacherStates | None]:
        """The teacher pass over `mbs`: per micro-batch (last stage; an empty list elsewhere)
        the teacher's hidden states at its response tokens, and log q(y_t) for RLSD.

        `needed` ([samples] bool, `algo.teacher_sample_mask`): the samples the loss uses the
        teacher for. Only those run, packed into as few micro-batches as they fill; each
        student micro-batch then gets its needed tokens' rows, or None when it has none.
        None: every sample, in the student's own micro-batches."""
        need_logprobs = self.config.algorithm.advantage_reweighting != "none"
        model = self.reference if self.config.algorithm.teacher_weights == "reference" else self.policy.model

        def collect(states, weight, mb):
            logprobs = self._stats(states, weight.detach(), mb.targets).logprobs if need_logprobs else None
            return states.detach(), logprobs

        order = [int(i) for mb in mbs for i in mb.sample_ids.cpu().unique_consecutive()]  # samples with tokens
        if needed is None or all(needed[i] for i in order):
            outputs = self._forward_only(model, batch, mbs, "teacher", collect)
            return [TeacherStates(states, logprobs) for states, logprobs in outputs]
        if need_logprobs:
            raise ValueError("RLSD and OPSD weight every token by log q(y_t): the teacher must run on every sample")
        ids = [i for i in order if needed[i]]
        rows_per_mb = mbs[0].tokens.shape[0]
        outputs = []
        if ids or self._experts_across_replicas:  # a rank without needed samples still joins the all-to-alls
            # with PP and fixed shapes the stages exchange [s, micro-batch, H] of one size:
            # the last micro-batch is topped up with repeats (their rows dropped)
            filler = -len(ids) % rows_per_mb if self.groups.pp_size > 1 and not self.variable_shapes else 0
            budget = self.config.schedule.max_tokens_per_micro_batch
            teacher_mbs = micro_batches(batch, ids + ids[-1:] * filler, rows_per_mb, torch.zeros(len(batch.samples)),
                                        0, device=mbs[0].tokens.device, max_tokens=budget) if ids else []
            outputs = self._forward_only(model, batch, teacher_mbs, "teacher", collect, filler=mbs)
        if not self.groups.is_last_stage:
            return []
        # each needed sample's first row in `states`: the teacher micro-batches keep the order
        # of `ids` (under dynamic batching `ids` is already length-sorted, and the sort is stable)
        start, offset = {}, 0
        for i in ids:
            start[i] = offset
            offset += len(batch.samples[i].response)
        states = torch.cat([s for s, _ in outputs])[:offset] if outputs else None
        result = []
        for mb in mbs:
            sample_ids = mb.sample_ids.cpu()
            keep = needed[sample_ids]
            if not keep.any():
                result.append(None)
                continue
            source = torch.cat([torch.arange(start[i], start[i] + len(batch.samples[i].response))
                                for i in sample_ids[keep].unique_consecutive().tolist()])
            rows = None if keep.all() else keep.nonzero().squeeze(1).to(states.device)
            result.append(TeacherStates(states[source.to(states.device)], None, rows))
        return result

    def train(self, batch: StepBatch, mbs: list[MicroBatch], step: int, teacher, reference, *,
              first_minibatch: bool, old=None, gated_token_scale: float = 1.0) -> StepResult:
        """Student forward/backward over one PPO mini-batch and one optimizer step; each
        micro-batch's loss is a `StudentLoss` (student_loss.py).

        teacher: per micro-batch `TeacherStates` (None: the teacher pass did not run);
        reference: per micro-batch [N] log π_ref or None. old: per micro-batch [N]
        log π_old (`old_logprobs`); None takes the engine's sampling log-probs as π_old.
        gated_token_scale: for algorithm.loss_tokens="gated", the mini-batch's (all
        tokens) / (tokens of samples with A > 0).

        On the first mini-batch the policy still holds the weights the engines sampled
        with, so |log π_θ − log π_engine| there measures trainer/engine agreement
        ("rollout_logprob_abs_diff": numerics only, unless a weight push went wrong)."""
        fewest, most = self._micro_batch_counts(len(mbs))
        if fewest != most:  # every micro-batch trains: none can be repeated to pair the all-to-alls up
            raise ValueError(
                f"data-parallel ranks have {fewest} to {most} micro-batches in this mini-batch, but with experts split "
                "across them (parallel.expert_parallel > 1) every rank must run as many: set "
                "schedule.max_tokens_per_micro_batch=None (fixed micro_batch_size) for mixture-of-experts models"
            )
        settings = LossSettings(
            config=self.config, group=self.groups.loss_tp_group, vocab_size=self.arch.vocab_size, step=step,
            single_pass=takes_single_pass(self.config), gated_token_scale=gated_token_scale,
            first_minibatch=first_minibatch)
        output_weight = self.policy.module.output_weight
        # the per-micro-batch results of the earlier passes live on the last stage, where the loss runs
        last = self.groups.is_last_stage
        earlier = [{name: values[j] if last and values is not None else None
                    for name, values in (("teacher", teacher), ("reference", reference), ("old", old))}
                   for j in range(len(mbs))]

        def forward_step(data_iterator, model):
            j, mb = next(data_iterator)
            inputs = self._model_input(mb, "student")
            hidden = model(inputs.tokens, inputs.positions, None, packed_seq_params=inputs.packed_seq_params,
                           return_hidden=True)
            return hidden, StudentLoss(settings, mb, inputs.response_mask, output_weight,
                                       teacher_ran=teacher is not None, **earlier[j])

        return train_step(self.policy, forward_step, iter(enumerate(mbs)), num_microbatches=len(mbs),
                          seq_length=batch.student_length, micro_batch_size=mbs[0].tokens.shape[0])

    # ------------------------------------------------------------------ reductions

    def _contributes(self) -> bool:
        """One rank per data-parallel replica holds the last stage's per-token results."""
        return self.groups.is_last_stage and self.groups.tp_rank == 0

    def sum_per_sample(self, batch: StepBatch, shapes: list[list[MicroBatch]], per_token: list[list[torch.Tensor]],
                       fn: Callable[[MicroBatch, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Σ_t fn(mb, values) per sample over the whole batch, on every rank."""
        totals = torch.zeros(len(batch.samples), dtype=torch.float64)
        if self._contributes():
            for mbs, values in zip(shapes, per_token):
                for mb, value in zip(mbs, values):
                    totals.index_add_(0, mb.sample_ids.cpu(), fn(mb, value).double().cpu())
        dist.all_reduce(totals)
        return totals

    def reduce_metrics(self, results: list[StepResult]) -> dict[str, float]:
        """Token-weighted means of the loss metrics over the step (meaningful on rank 0), a
        mixture-of-experts model's router metrics averaged over the step's updates; with
        logging.term_pulls, each term's pull: the norm of its gradient w.r.t. the last
        hidden states over the step's tokens, divided by their count (the gradient of the
        term's token-mean), and the ratio of OPD's to the outcome term's."""
        n = len(LOSS_METRICS)
        sums = torch.zeros(2 * n + len(PULL_TERMS) + 1, dtype=torch.float64)
        if self._contributes():
            for result in results:
                for report in result.losses:
                    tokens = float(report.get("tokens", 0.0))
                    sums[-1] += tokens
                    for i, key in enumerate(LOSS_METRICS):
                        if key in report:
                            sums[2 * i] += float(report[key])
                            sums[2 * i + 1] += float(report.get(f"{key}/tokens", tokens))
                    for i, term in enumerate(PULL_TERMS):
                        sums[2 * n + i] += float(report.get(f"pull/{term}", 0.0))
        dist.all_reduce(sums)
        metrics = {key: (sums[2 * i] / sums[2 * i + 1]).item() for i, key in enumerate(LOSS_METRICS) if sums[2 * i + 1] > 0}
        metrics["train_tokens"] = sums[-1].item()
        if self.config.logging.term_pulls:
            pulls = {term: (sums[2 * n + i].sqrt() / sums[-1].clamp_min(1.0)).item() for i, term in enumerate(PULL_TERMS)}
            metrics.update({f"pull/{term}": pull for term, pull in pulls.items()})
            if pulls["outcome"] > 0:
                metrics["pull/opd_to_outcome"] = pulls["opd"] / pulls["outcome"]
        routed = [result.router for result in results if result.router]  # mixture of experts: per update
        metrics.update({key: sum(r[key] for r in routed) / len(routed) for key in (routed[0] if routed else ())})
        return metrics
