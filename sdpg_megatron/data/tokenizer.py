"""A character-level tokenizer with Qwen3's chat tokens, for tiny models and CPU tests.

One token per printable ASCII character (32..126) and "\\n", `<unk>` for anything else,
plus Qwen3's `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as single special tokens and
Qwen3's chat layout (with `thinking=True` also Qwen3's `enable_thinking` switch). Encoding is lossless on printable ASCII with
newlines: no normaliser, no BOS, no whitespace handling, a decoder that only concatenates.

`phrases` adds whole strings as single tokens (ids after the special tokens), matched
before the character split, as a BPE vocabulary holds its frequent words: the embedded
demo passes the prompt templates' fixed text (`data.TEMPLATE_PHRASES`), so a prompt costs
about as many tokens as under a real tokenizer instead of one per character.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import transformers

CHAT_EOS = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", CHAT_EOS)

CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n",)

# Qwen3's template for plain user/assistant/system turns, without the <think> handling.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same with Qwen3's thinking switch: thinking is on unless enable_thinking is false, in
# which case the generation prompt carries an empty think block. The tags are plain
# characters here (one token each in Qwen3's vocabulary).
THINKING_CHAT_TEMPLATE = CHAT_TEMPLATE + (
    "{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)


def build_char_tokenizer(
    out_dir: str | os.PathLike | None = None, *, thinking: bool = False, phrases: Sequence[str] = (),
) -> transformers.PreTrainedTokenizerFast:
    """The character tokenizer (vocab size 100 + len(phrases)); saved to out_dir when given.
    `thinking`: its chat template has Qwen3's enable_thinking switch.

    Ids: 0 `<unk>`, 1..96 the characters, 97..99 the special tokens in SPECIAL_TOKENS order,
    then one per phrase, in the order given (each of at least two printable characters).
    """
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {UNK_TOKEN: 0}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own word; WordLevel then maps it to one id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    bad = [phrase for phrase in phrases if len(phrase) < 2 or not set(phrase) <= set(CHARACTERS)]
    if bad or len(set(phrases)) != len(phrases):
        raise ValueError(f"build_char_tokenizer: phrases must be distinct strings of at least two printable "
                         f"ASCII characters or newlines; got {bad or 'duplicates'}")
    backend.add_tokens([AddedToken(phrase, special=False, normalized=False) for phrase in phrases])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        eos_token=CHAT_EOS,
        pad_token=PAD_TOKEN,
        chat_template=THINKING_CHAT_TEMPLATE if thinking else CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
