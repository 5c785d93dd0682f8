"""Which problems are English: a script test on the question's letters.

The paper trains on "the 13.9k English rows of the 17,398 unique rows" of DAPO-Math-17k;
the public release mixes in problems written in Chinese. No language model or
language-identification package is used: the rule below is a pure function of the text,
deterministic across machines and library versions, and cheap enough for every row.

The rule. A text is English when every *letter* in it (Unicode general category L*:
Lu, Ll, Lt, Lm, Lo) lies in one of these blocks:

    U+0000-U+02FF   Basic Latin, Latin-1 Supplement, Latin Extended-A/B, IPA Extensions,
                    Spacing Modifier Letters (é, ë, ñ, ß, º, ʹ)
    U+0370-U+03FF   Greek and Coptic (π, θ, Σ, ω)
    U+1D00-U+1DBF   Phonetic Extensions (superscript letters such as ᵀ, ᵢ)
    U+1E00-U+1FFF   Latin Extended Additional, Greek Extended
    U+2070-U+209F   Superscripts and Subscripts (ⁿ, ₖ)
    U+2100-U+214F   Letterlike Symbols (ℝ, ℕ, ℓ, ℵ)
    U+1D400-U+1D7FF Mathematical Alphanumeric Symbols (𝑥, 𝔽, 𝟙)

Any other letter (CJK ideographs, kana, hangul, Cyrillic, Arabic, Hebrew, Thai,
Devanagari, full-width Latin, ...) makes the text non-English. Everything that is not a
letter is ignored: digits, spaces, punctuation (also the full-width kind) and math
symbols (×, ≤, ∑, √, °, ¾ are categories Sm/So/No/Po, not L*).

Why this rule:
- Letters carry the language; symbols do not. So math in LaTeX or in Unicode never
  decides the outcome, and nothing has to be stripped first: LaTeX commands are ASCII,
  and Greek letters (π as a Unicode character, common in English problems) are allowed.
  Not stripping LaTeX on purpose: `$5\\text{千克}$` holds Chinese words the model must
  read, so it counts.
- One foreign letter suffices (no ratio threshold): Chinese problems are mostly ASCII
  math with a few dozen ideographs, so any letters-ratio cut would have to be tuned on
  data we cannot inspect here, while a stray ideograph in an otherwise English problem
  is rare and still marks it as not plain English.
- Latin-script accents are allowed because English problems name people and places
  (Zoë, José, Gödel).

Limits: this is a script test, not a language identifier. A problem in French, German,
Spanish or Vietnamese (Latin script) counts as English, and a look-alike Cyrillic letter
typed by mistake (С for C) makes an English problem non-English. The public release's
non-English rows are Chinese, which the rule separates exactly.
"""

from __future__ import annotations

import unicodedata

# (first, last) code points, inclusive, of the blocks whose letters count as English.
ENGLISH_LETTER_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x02FF),
    (0x0370, 0x03FF),
    (0x1D00, 0x1DBF),
    (0x1E00, 0x1FFF),
    (0x2070, 0x209F),
    (0x2100, 0x214F),
    (0x1D400, 0x1D7FF),
)


def _allowed(code_point: int) -> bool:
    return any(first <= code_point <= last for first, last in ENGLISH_LETTER_RANGES)


def first_non_english_letter(text: str) -> str | None:
    """The first letter of `text` outside ENGLISH_LETTER_RANGES, or None (the module's rule).

    Reports quote it (with its Unicode name) so a reader can audit why a row was dropped.
    """
    if text.isascii():  # the common case, and every ASCII letter is allowed
        return None
    for character in text:
        code_point = ord(character)
        if code_point < 0x0300:
            continue
        if unicodedata.category(character).startswith("L") and not _allowed(code_point):
            return character
    return None


def is_english(question: str) -> bool:
    """True when every letter of `question` is Latin, Greek or a math letter.

    See the module docstring for the exact blocks and why the rule is a script test.
    """
    return first_non_english_letter(question) is None
