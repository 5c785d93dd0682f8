"""Tensor-parallel pieces: the fused vocab-parallel loss statistics.

Functions here take an explicit process group; nothing in this package reads global
parallel state except the (later) module that hands the groups out.
"""

from sdpg_megatron.parallel.chunks import TokenStats
from sdpg_megatron.parallel.single_pass import vocab_parallel_token_loss
from sdpg_megatron.parallel.vocab_parallel import padded_vocab_size, split_vocab_shard, vocab_parallel_token_stats

__all__ = ["TokenStats", "padded_vocab_size", "split_vocab_shard", "vocab_parallel_token_loss",
           "vocab_parallel_token_stats"]
