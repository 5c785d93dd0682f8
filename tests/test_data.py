"""sdpg_megatron.data: parquet loading, sampling, templates, char tokenizer, synthetic task."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdpg_megatron.data import (
    CHAT_EOS,
    Problem,
    PromptSampler,
    PromptTooLongError,
    arithmetic_problems,
    build_char_tokenizer,
    encode_problem,
    extract_question,
    first_non_english_letter,
    is_english,
    load_dapo_parquet,
    render_prompt,
    sft_examples,
    student_content,
    teacher_content,
    template_supports_thinking,
    write_dapo_parquet,
)

EVAL_DIR = Path(os.environ.get("SDPG_EVAL_DIR", Path(__file__).resolve().parents[1] / "data" / "eval"))
EVAL_FILES = {"aime-2024.parquet": 30, "aime25.parquet": 30, "amc-23.parquet": 40}

DAPO_WRAPPED = (
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
    "problem.\n\n{question}\n\nRemember to put your answer on its own line after \"Answer:\"."
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _user(content):
    return [{"role": "user", "content": content}]


def _write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def _row(content, ground_truth, index=None, solution=None):
    extra_info = {"index": index, "solution": solution}
    return {
        "data_source": "test",
        "prompt": content if isinstance(content, list) else _user(content),
        "ability": "MATH",
        "reward_model": {"ground_truth": ground_truth, "style": "rule"},
        "extra_info": extra_info,
    }


# ---- DAPO parquet -------------------------------------------------------------------


def test_dedup_and_invalid_rows(tmp_path):
    rows = [
        _row(DAPO_WRAPPED.format(question="What is 1+1?"), "2", index="a"),
        _row(DAPO_WRAPPED.format(question="What is 2+2?"), "", index="b"),  # no ground truth
        _row([], "3", index="c"),  # empty prompt
        _row(DAPO_WRAPPED.format(question="What is 1+1?"), "2", index="a"),  # duplicate
        _row([{"role": "system", "content": "be brief"}], "5", index="d"),  # no user message
        _row(DAPO_WRAPPED.format(question="  "), "7", index="e"),  # empty question
        _row(student_content("What is 3+3?"), "6", index="f", solution="3+3=6"),
        # same question, other answer: not a duplicate
        _row("  What is 1+1?\n", "3", index="g"),
    ]
    path = tmp_path / "train.parquet"
    _write_rows(path, rows)
    report = load_dapo_parquet(path)
    assert report.num_rows == 8
    assert report.num_duplicates == 1
    assert report.num_invalid == 4
    assert report.invalid == [
        "row 1: no ground truth (reward_model.ground_truth is empty)",
        "row 2: no user message in prompt",
        "row 4: no user message in prompt",
        "row 5: empty question in the user message",
    ]
    assert [(p.uid, p.question, p.answer, p.solution) for p in report.problems] == [
        ("a", "What is 1+1?", "2", None),
        ("f", "What is 3+3?", "6", "3+3=6"),
        ("g", "What is 1+1?", "3", None),
    ]
    assert all(p.data_source == "test" for p in report.problems)


def test_invalid_reasons_are_capped(tmp_path):
    path = tmp_path / "bad.parquet"
    _write_rows(path, [_row(f"q{k}", None) for k in range(30)])
    report = load_dapo_parquet(path)
    assert report.num_invalid == 30 and len(report.invalid) == 20 and report.problems == []


def test_uid_falls_back_to_question_hash_when_index_is_not_a_problem_id(tmp_path):
    path = tmp_path / "eval.parquet"
    # index holds the sample number, as in the AIME 2025 / AMC 2023 eval files
    _write_rows(path, [_row(q, "1", index=k) for k in range(2) for q in ("x?", "y?")])
    first = load_dapo_parquet(path).problems
    assert len(first) == 2 and len({p.uid for p in first}) == 2
    assert all(p.uid.startswith("q-") for p in first)
    assert [p.uid for p in load_dapo_parquet(path).problems] == [p.uid for p in first]


def test_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "no_reward.parquet"
    rows = [_row("q", "1")]
    del rows[0]["reward_model"]
    _write_rows(path, rows)
    with pytest.raises(ValueError, match=r"no_reward\.parquet.*reward_model"):
        load_dapo_parquet(path)
    with pytest.raises(ValueError, match="nowhere.parquet"):
        load_dapo_parquet(tmp_path / "nowhere.parquet")


@pytest.mark.parametrize("name", sorted(EVAL_FILES))
def test_real_eval_files(name):
    path = EVAL_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    report = load_dapo_parquet(path)
    assert len(report.problems) == EVAL_FILES[name]
    assert report.num_rows == 32 * EVAL_FILES[name]
    assert report.num_invalid == 0
    assert report.num_duplicates == report.num_rows - len(report.problems)
    assert len({p.uid for p in report.problems}) == len(report.problems)
    raw = {
        row["raw_problem"].strip()
        for row in pq.read_table(path, columns=["extra_info"]).column("extra_info").to_pylist()
    }
    for problem in report.problems:
        assert "Answer:" not in problem.question and "step by step" not in problem.question
        assert problem.question == problem.question.strip() and problem.answer
        assert problem.question in raw


def test_extract_question_is_whitespace_tolerant():
    sloppy = DAPO_WRAPPED.format(question="Q?").replace("\n\n", "\n  ").replace(". ", ".  ")
    assert extract_question(sloppy) == "Q?"
    assert extract_question(student_content("a\nb")) == "a\nb"
    assert extract_question("  plain question  ") == "plain question"


def test_write_load_round_trip(tmp_path):
    problems = arithmetic_problems(50, seed=3)
    problems.append(Problem(uid="u1", question="Why {x}?", answer="\\frac{1}{2}"))
    for wrap in ("boxed", "answer", "none"):
        path = tmp_path / wrap / "synthetic.parquet"
        write_dapo_parquet(problems, path, wrap=wrap)
        assert [p.name for p in path.parent.iterdir()] == ["synthetic.parquet"]
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
        report = load_dapo_parquet(path)
        assert report.problems == problems
        assert report.num_duplicates == report.num_invalid == 0
    row = pq.read_table(path).to_pylist()[0]
    assert row["reward_model"] == {"ground_truth": problems[0].answer, "style": "rule"}
    assert row["ability"] == "MATH"
    assert row["extra_info"]["index"] == problems[0].uid
    boxed = pq.read_table(tmp_path / "boxed" / "synthetic.parquet").to_pylist()[0]
    assert boxed["prompt"] == _user(student_content(problems[0].question))


# ---- sampler ------------------------------------------------------------------------


def test_sampler_is_a_pure_function_of_seed_and_step():
    problems = [Problem(uid=str(k), question=f"q{k}", answer="1") for k in range(10)]
    sampler = PromptSampler(problems, seed=7)
    batches = [sampler.batch(step, 4) for step in range(10)]
    resumed = PromptSampler(problems, seed=7)
    assert [resumed.batch(step, 4) for step in (5, 2, 9)] == [batches[5], batches[2], batches[9]]
    assert batches[0] != batches[1]
    assert PromptSampler(problems, seed=8).batch(0, 10) != sampler.batch(0, 10)
    stream = [p for batch in batches for p in batch]
    for epoch in range(4):
        assert sorted(p.uid for p in stream[10 * epoch: 10 * (epoch + 1)]) == sorted(
            p.uid for p in problems
        )
    assert stream[:10] != stream[10:20]  # each epoch draws a new permutation
    with pytest.raises(ValueError):
        PromptSampler([], seed=0)


# ---- templates ----------------------------------------------------------------------


def test_template_texts():
    assert student_content("Q") == (
        "Solve the following math problem step by step. Present your final answer inside "
        "\\boxed{}, for example \\boxed{42}.\n\nQ\n\n"
        "Remember to put your final answer inside \\boxed{}."
    )
    assert teacher_content("Q", "7") == student_content("Q") + (
        "\n\nThe correct answer to this problem is: 7\n"
        "Use this to verify your reasoning, but show your full solution process."
    )
    # Fig. 4's answer+solution context, character for character: three lines.
    fig4 = (
        "[Hint] The correct answer is 7. A common way to solve this is:\n"
        "3 + 4 = 7.\n"
        "[Instruction] If possible, derive the answer 7 using an alternative, equally rigorous "
        "mathematical approach (e.g., algebraic vs geometric, or different substitution). If no "
        "alternative exists, articulate the standard approach with exceptional clarity. Do NOT "
        "state that you were given the answer or reference."
    )
    with_solution = teacher_content("Q", "7", "3 + 4 = 7.")
    assert with_solution == student_content("Q") + "\n\n" + fig4
    assert len(fig4.split("\n")) == 3
    assert teacher_content("Q", "7", "\n 3 + 4 = 7. \n") == with_solution  # solution stripped
    # a multi-line solution keeps its own lines; the hint and instruction stay one line each
    lines = teacher_content("Q", "7", "3 + 4\n= 7.").split("\n\n")[-1].split("\n")
    assert lines[0].startswith("[Hint]") and lines[1:3] == ["3 + 4", "= 7."]
    assert lines[3].startswith("[Instruction]") and len(lines) == 4


def test_teacher_prompt_extends_student_prefix(tokenizer):
    problem = Problem(uid="p", question="What is 2 + 2?", answer="4", solution="2 + 2 = 4.")
    student_prefix = tokenizer.encode("<|im_start|>user\n")
    assert render_prompt(tokenizer, "", enable_thinking=False)[: len(student_prefix)] == student_prefix
    assistant_header = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    for privileged in ("answer", "answer+solution"):
        encoded = encode_problem(tokenizer, problem, max_prompt_tokens=2048, enable_thinking=True,
                                 privileged=privileged)
        assert isinstance(encoded.student_ids, list)
        assert all(type(token_id) is int for token_id in encoded.student_ids)
        assert len(encoded.teacher_ids) > len(encoded.student_ids)
        # identical up to the end of the student content, then the privileged context
        content_end = len(encoded.student_ids) - len(assistant_header)
        assert encoded.teacher_ids[:content_end] == encoded.student_ids[:content_end]
        assert encoded.teacher_ids[: len(student_prefix)] == student_prefix
        assert encoded.teacher_ids[-len(assistant_header):] == assistant_header
    answer_only = encode_problem(tokenizer, problem, max_prompt_tokens=2048, enable_thinking=True)
    no_solution = Problem(uid="p", question=problem.question, answer="4")
    fallback = encode_problem(tokenizer, no_solution, max_prompt_tokens=2048, enable_thinking=True,
                              privileged="answer+solution")
    assert fallback == answer_only
    none = encode_problem(tokenizer, problem, max_prompt_tokens=2048, enable_thinking=True,
                          privileged="none")
    assert none.teacher_ids == none.student_ids == answer_only.student_ids


def test_prompt_too_long(tokenizer):
    problem = Problem(uid="long-1", question="x" * 50, answer="1")
    num_student = len(render_prompt(tokenizer, student_content(problem.question), enable_thinking=True))
    with pytest.raises(PromptTooLongError, match=rf"long-1.*{num_student}.*{num_student - 1}"):
        encode_problem(tokenizer, problem, max_prompt_tokens=num_student - 1, enable_thinking=True)
    # the student fits, the teacher does not: still an error, never a truncation
    with pytest.raises(PromptTooLongError, match="teacher"):
        encode_problem(tokenizer, problem, max_prompt_tokens=num_student, enable_thinking=True)
    assert issubclass(PromptTooLongError, ValueError)
    with pytest.raises(ValueError, match="privileged"):
        encode_problem(tokenizer, problem, max_prompt_tokens=10**6, enable_thinking=True,
                       privileged="solution")


def test_render_prompt_passes_enable_thinking_only_when_the_template_knows_it():
    class FakeTokenizer:
        def __init__(self, chat_template):
            self.chat_template, self.kwargs = chat_template, None

        def apply_chat_template(self, messages, **kwargs):
            self.kwargs = kwargs
            return {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]}

    qwen3 = FakeTokenizer("{% if enable_thinking is defined and enable_thinking is false %}")
    assert template_supports_thinking(qwen3)
    for flag in (True, False):
        assert render_prompt(qwen3, "hi", enable_thinking=flag) == [1, 2, 3]
        assert qwen3.kwargs["enable_thinking"] is flag
    plain = FakeTokenizer("{{ messages }}")
    assert not template_supports_thinking(plain)
    for flag in (True, False):
        render_prompt(plain, "hi", enable_thinking=flag)
        assert "enable_thinking" not in plain.kwargs
    with pytest.raises(TypeError, match="enable_thinking"):
        render_prompt(plain, "hi")  # required: callers must say which mode they train in


# Qwen3's handling of the switch, on the project's chat layout: after the generation prompt,
# an empty think block only when enable_thinking is false (Qwen3's own template does the same).
QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen3_like_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    return tokenizer


def test_thinking_on_ends_at_the_assistant_header_off_adds_an_empty_think_block(qwen3_like_tokenizer):
    tokenizer = qwen3_like_tokenizer
    header = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    on = tokenizer.decode(render_prompt(tokenizer, "hi", enable_thinking=True))
    off = tokenizer.decode(render_prompt(tokenizer, "hi", enable_thinking=False))
    assert on == header
    assert off == header + "<think>\n\n</think>\n\n"
    problem = Problem(uid="p", question="What is 2 + 2?", answer="4", solution="2 + 2 = 4.")
    for flag, suffix in ((True, "<|im_start|>assistant\n"),
                         (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n")):
        for privileged in ("answer", "answer+solution", "none"):
            encoded = encode_problem(tokenizer, problem, max_prompt_tokens=4096, enable_thinking=flag,
                                     privileged=privileged)
            # both views share the assistant prefix the response tokens follow
            assert tokenizer.decode(encoded.student_ids).endswith("<|im_end|>\n" + suffix)
            assert tokenizer.decode(encoded.teacher_ids).endswith("<|im_end|>\n" + suffix)


def test_char_tokenizer_ignores_the_thinking_flag(tokenizer):
    assert not template_supports_thinking(tokenizer)
    assert render_prompt(tokenizer, "hi", enable_thinking=True) == render_prompt(
        tokenizer, "hi", enable_thinking=False)
    problem = Problem(uid="p", question="What is 2 + 2?", answer="4", solution="2 + 2 = 4.")
    for privileged in ("answer", "answer+solution", "none"):
        on, off = (encode_problem(tokenizer, problem, max_prompt_tokens=4096, enable_thinking=flag,
                                  privileged=privileged) for flag in (True, False))
        assert on == off
    assert tokenizer.decode(render_prompt(tokenizer, "hi", enable_thinking=False)).endswith(
        "<|im_start|>assistant\n")


# ---- English rule -------------------------------------------------------------------

ENGLISH = [
    "What is $1+1$?",
    "Compute $\\frac{\\pi}{2} \\times \\sqrt{3}$ and $\\sum_{k=1}^{n} k$.",
    "Using π ≈ 3.14, is 2 × 3 ≤ 7 and 5 ≥ 4? Find θ, Σ and ω.",
    "Zoë and José share ¾ of 12 apples; Gödel, Erdős and Noël count ñ and ß.",
    "Let f: ℝ → ℝ with f(x)² = xⁿ, x ∈ ℕ, ℓ = 𝑥 + 𝔽 and |ℵ₀| (ᵀ, ₖ).",
    "In △ABC, ∠A = 60°, AB ∥ CD, AB ⊥ BC, 30º, and the answer is −5 ± √2.",
    "“Quoted” — with an em dash… and a bullet • point（full-width parentheses）.",
    "",
]
NON_ENGLISH = [
    ("已知 $x^2 = 4$，求 $x$ 的值。", "已"),
    ("A bag weighs $5\\text{千克}$; how many grams?", "千"),  # inside LaTeX still counts
    ("次の値を求めよ: $2+3$", "次"),
    ("ひらがな $x$", "ひ"),
    ("カタカナ", "カ"),
    ("ー", "ー"),  # a kana modifier letter (category Lm)
    ("다음을 계산하시오: $2+2$", "다"),
    ("Найдите $x$, если $2x = 4$.", "Н"),
    ("Find $x$ (Сase with a Cyrillic С).", "С"),
    ("احسب $x$", "ا"),
    ("חשב את x", "ח"),
    ("คำนวณ", "ค"),
    ("गणना करें", "ग"),
    ("Ｆｕｌｌ-width Latin", "Ｆ"),
]


def test_is_english_is_a_script_test_on_letters():
    for text in ENGLISH:
        assert is_english(text), text
        assert first_non_english_letter(text) is None
    for text, letter in NON_ENGLISH:
        assert not is_english(text), text
        assert first_non_english_letter(text) == letter


# ---- character tokenizer ------------------------------------------------------------


def test_char_tokenizer_is_lossless(tokenizer):
    texts = [
        teacher_content("Let $f(x) = \\frac{1}{2}x^{2}$ ; find {f}.\n  Indented  ", "\\{42\\}",
                        "a\\b  c\n\n"),
        "".join(chr(code) for code in range(32, 127)) + "\n \n",
        "  leading and trailing  ",
        "a . b 's n't , c",
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text) == ids  # no BOS / EOS added
    assert 95 <= len(tokenizer) <= 110
    assert tokenizer.eos_token == CHAT_EOS and tokenizer.pad_token == "<|endoftext|>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(special)) == 1
    assert tokenizer.convert_tokens_to_ids(CHAT_EOS) == tokenizer.eos_token_id
    rendered = tokenizer.decode(render_prompt(tokenizer, "hi\\{}", enable_thinking=True))
    assert rendered == "<|im_start|>user\nhi\\{}<|im_end|>\n<|im_start|>assistant\n"


def test_char_tokenizer_save_load_identity(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    build_char_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = teacher_content("What is {a} \\ b?", "7") + " . 's"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.chat_template == tokenizer.chat_template
    assert render_prompt(loaded, text, enable_thinking=True) == render_prompt(tokenizer, text, enable_thinking=True)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token, loaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)


# ---- synthetic task -----------------------------------------------------------------


def test_arithmetic_problems():
    problems = arithmetic_problems(300, seed=11, ops="+-*")
    assert problems == arithmetic_problems(300, seed=11, ops="+-*")
    assert problems != arithmetic_problems(300, seed=12, ops="+-*")
    assert len({p.question for p in problems}) == 300
    assert {p.question.split()[3] for p in problems} == {"+", "-", "*"}
    for k, problem in enumerate(problems):
        expression = problem.question.removeprefix("What is ").removesuffix("?")
        assert int(problem.answer) == eval(expression)  # noqa: S307 - our own digits and ops
        assert int(problem.answer) >= 0
        assert problem.solution == f"{expression} = {problem.answer}.\n\\boxed{{{problem.answer}}}"
        assert len(problem.solution) <= 40
        assert problem.uid == f"arith-11-{k}" and problem.data_source == "synthetic-arithmetic"
    everything = arithmetic_problems(3 * 3 + 3 * 4 // 2, seed=0, max_operand=2)
    assert len({p.question for p in everything}) == 15
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic_problems(16, seed=0, max_operand=2)
    with pytest.raises(ValueError, match="ops"):
        arithmetic_problems(1, seed=0, ops="/")


def test_sft_examples_pair_both_views():
    problems = arithmetic_problems(2, seed=0)
    examples = sft_examples(problems)
    assert examples == [
        (student_content(problems[0].question), problems[0].solution),
        (teacher_content(problems[0].question, problems[0].answer), problems[0].solution),
        (student_content(problems[1].question), problems[1].solution),
        (teacher_content(problems[1].question, problems[1].answer), problems[1].solution),
    ]
    with pytest.raises(ValueError, match="no solution"):
        sft_examples([Problem(uid="x", question="q", answer="1")])


def test_column_addition_problems_work_every_column_with_its_carry():
    from sdpg_megatron.data import column_addition_problems, column_steps

    problems = column_addition_problems(500, seed=4, digits=4)
    assert problems == column_addition_problems(500, seed=4, digits=4)
    assert problems != column_addition_problems(500, seed=5, digits=4)
    assert len({p.question for p in problems}) == 500
    for problem in problems:
        a, b = (int(x) for x in problem.question.removeprefix("What is ").removesuffix("?").split(" + "))
        assert 1000 <= a <= 9999 and 1000 <= b <= 9999 and int(problem.answer) == a + b
        *lines, boxed = problem.solution.split("\n")
        assert boxed == f"\\boxed{{{a + b}}}" and lines == column_steps(a, b) and len(lines) == 4
        # each line: the column's digits (and carry) and their sum; the written digits are the answer's
        carry, written = 0, ""
        for column, line in enumerate(lines):
            terms, total = line.split("=")
            x, y, *rest = (int(t) for t in terms.split("+"))
            assert (x, y) == (a // 10**column % 10, b // 10**column % 10) and rest == ([carry] if carry else [])
            assert int(total) == x + y + carry
            carry, written = int(total) // 10, str(int(total) % 10) + written
        assert (str(carry) if carry else "") + written == problem.answer
    assert column_steps(5, 7) == ["5+7=12"] and column_steps(95, 7) == ["5+7=12", "9+0+1=10"]
    assert len(column_addition_problems(100, seed=0, digits=1)) == 100  # 0..9 + 0..9: all of them
    with pytest.raises(ValueError, match="distinct problems"):
        column_addition_problems(101, seed=0, digits=1)


def test_sft_examples_with_the_solution_in_the_teacher_view():
    problems = arithmetic_problems(2, seed=0)
    examples = sft_examples(problems, with_solution=True)
    assert examples[1] == (teacher_content(problems[0].question, problems[0].answer, problems[0].solution),
                           problems[0].solution)
    assert problems[0].solution in examples[1][0] and examples[0] == sft_examples(problems)[0]


def test_the_control_shows_the_teacher_another_problems_context(tokenizer, tmp_path):
    from sdpg_megatron.data.prompt_set import PromptSet

    problems = arithmetic_problems(3, seed=1)
    own = encode_problem(tokenizer, problems[0], max_prompt_tokens=1000, enable_thinking=False,
                         privileged="answer+solution")
    other = encode_problem(tokenizer, problems[0], max_prompt_tokens=1000, enable_thinking=False,
                           privileged="answer+solution", context_from=problems[1])
    assert other.student_ids == own.student_ids and other.teacher_ids != own.teacher_ids
    assert tokenizer.decode(other.teacher_ids) == tokenizer.decode(render_prompt(
        tokenizer, teacher_content(problems[0].question, problems[1].answer, problems[1].solution),
        enable_thinking=False))
    path = tmp_path / "train.parquet"
    write_dapo_parquet(problems, path)
    settings = dict(max_prompt_tokens=1000, privileged="answer+solution", enable_thinking=False, seed=0, min_problems=3)
    control = {p.uid: (e, p) for e, p in PromptSet([str(path)], tokenizer, privileged_from="other", **settings).take(3)}
    normal = {p.uid: (e, p) for e, p in PromptSet([str(path)], tokenizer, **settings).take(3)}
    for uid, (encoded, problem) in control.items():
        # the reward keeps the problem's own answer; only the teacher's context is another problem's
        assert problem.answer == normal[uid][1].answer and encoded.student_ids == normal[uid][0].student_ids
        assert encoded.teacher_ids != normal[uid][0].teacher_ids
        assert f"\\boxed{{{problem.answer}}}" not in tokenizer.decode(encoded.teacher_ids)
    write_dapo_parquet(problems[:1], path)
    with pytest.raises(ValueError, match="at least 2 problems"):
        PromptSet([str(path)], tokenizer, privileged_from="other", **{**settings, "min_problems": 1})


def test_tiny_warm_start_on_the_column_task_with_the_solution_in_the_teacher_view(tmp_path):
    """`python -m sdpg_megatron.tiny --task columns --privileged answer+solution` writes the
    column-addition data and a model (a few steps here; the accuracies are measured in
    docs/demo.md)."""
    from sdpg_megatron.tiny import main

    main(["--out", str(tmp_path), "--task", "columns", "--digits", "3", "--privileged", "answer+solution",
          "--train-problems", "20", "--sft-steps", "2", "--layers", "1"])
    summary = __import__("json").loads((tmp_path / "tiny_policy.json").read_text())
    assert summary["settings"]["task"] == "columns" and summary["settings"]["privileged"] == "answer+solution"
    assert summary["result"]["sft_steps"] == 2 and 0.0 <= summary["result"]["teacher_accuracy"] <= 1.0
    problems = load_dapo_parquet(tmp_path / "train.parquet").problems
    assert len(problems) == 20 and all(len(p.question.split(" + ")[1]) == 4 for p in problems)  # "ddd?"
    assert all(p.solution.count("\n") == 3 and p.solution.endswith(f"\\boxed{{{p.answer}}}") for p in problems)
    # the columns task's tokenizer holds the templates' fixed text as one token per phrase
    from transformers import AutoTokenizer

    from sdpg_megatron.data import TEMPLATE_PHRASES, render_prompt, student_content, teacher_content

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert len(tokenizer) == 100 + len(TEMPLATE_PHRASES) == 108
    problem = problems[0]
    student = render_prompt(tokenizer, student_content(problem.question), enable_thinking=True)
    teacher = render_prompt(tokenizer, teacher_content(problem.question, problem.answer, problem.solution),
                            enable_thinking=True)
    assert tokenizer.decode(teacher) == tokenizer.decode(build_char_tokenizer().encode(tokenizer.decode(teacher)))
    assert len(student) == 43 and len(teacher) == 84  # one per character: 204 and 612


def test_phrase_tokens_are_single_ids_matched_before_the_character_split():
    """`build_char_tokenizer(phrases=...)`: each phrase one id after the special tokens, the
    text around it still one id per character, decoding lossless; bad phrases are refused."""
    tokenizer = build_char_tokenizer(phrases=("hello world", "ab"))
    ids = tokenizer.encode("xhello worldab!", add_special_tokens=False)
    assert ids[1:3] == [100, 101] and len(ids) == 4 and tokenizer.decode(ids) == "xhello worldab!"
    assert tokenizer.encode("hello", add_special_tokens=False) == build_char_tokenizer().encode("hello")
    for bad in (("a",), ("ok", "ok"), ("é!",)):
        with pytest.raises(ValueError, match="phrases must be distinct"):
            build_char_tokenizer(phrases=bad)
