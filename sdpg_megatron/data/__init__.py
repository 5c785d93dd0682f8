"""Problems, prompts and tokenizers: DAPO-Math parquet, the student/teacher templates of
docs/method.md, the English-rows rule, a character tokenizer with Qwen3's chat tokens, and a
synthetic arithmetic task.
"""

from sdpg_megatron.data.dapo import (
    DatasetReport,
    Problem,
    PromptSampler,
    extract_question,
    load_dapo_parquet,
    write_dapo_parquet,
)
from sdpg_megatron.data.language import (
    ENGLISH_LETTER_RANGES,
    first_non_english_letter,
    is_english,
)
from sdpg_megatron.data.synthetic import arithmetic_problems, column_addition_problems, column_steps, sft_examples
from sdpg_megatron.data.templates import (
    TEMPLATE_PHRASES,
    EncodedPrompt,
    PromptTooLongError,
    encode_problem,
    render_prompt,
    student_content,
    teacher_content,
    template_supports_thinking,
)
from sdpg_megatron.data.tokenizer import CHAT_EOS, build_char_tokenizer

__all__ = [
    "CHAT_EOS",
    "DatasetReport",
    "ENGLISH_LETTER_RANGES",
    "EncodedPrompt",
    "Problem",
    "PromptSampler",
    "PromptTooLongError",
    "arithmetic_problems",
    "column_addition_problems",
    "column_steps",
    "build_char_tokenizer",
    "TEMPLATE_PHRASES",
    "encode_problem",
    "extract_question",
    "first_non_english_letter",
    "is_english",
    "load_dapo_parquet",
    "render_prompt",
    "sft_examples",
    "student_content",
    "teacher_content",
    "template_supports_thinking",
    "write_dapo_parquet",
]
