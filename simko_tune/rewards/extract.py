"""Pull the boxed final answer out of a model response or a gold rationale.

Plain string scanning only (no regex backtracking over the whole response): responses are
untrusted and can be megabytes long.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _brace_group(text: str, start: int) -> str | None:
    """Content of the `{...}` group opening at `text[start]`, or None if it never closes."""
    depth = 0
    backslashes = 0  # run of backslashes just before text[i]: an odd run escapes `\{` `\}`
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":
            backslashes += 1
            continue
        escaped = backslashes % 2 == 1
        backslashes = 0
        if escaped:
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _boxed_content(text: str, end: int) -> str | None:
    """Argument of a `\\boxed` whose name ends at `end`: a brace group or, for `\\boxed 5`,
    the next whitespace-free run (up to a `$`)."""
    i = end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _brace_group(text, i)
    j = i
    while j < len(text) and not text[j].isspace() and text[j] != "$":
        j += 1
    return text[i:j]


def extract_answer(text: str) -> str | None:
    """The last non-empty `\\boxed{...}` / `\\fbox{...}` (nested braces kept, `\\boxed 5`
    accepted): the paper's rule, so None when the response boxes no answer (free-form
    answers are the `math_verify` reward mode's job)."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _boxed_content(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def extract_gsm8k_gold(text: str) -> str:
    """GSM8K gold: the number after the last `#### `, thousands separators removed."""
    if "####" not in text:
        raise ValueError(f"GSM8K answer has no '####' marker: {text[-200:]!r}")
    return text.rsplit("####", 1)[1].strip().replace(",", "")
