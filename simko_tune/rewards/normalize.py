"""Answer normalisation for our plain-number and choice-letter rules (grader.py): strip
what surrounds a number (delimiters, spacing macros, `\\left`/`\\right`, units in `\\text{}`
or as words, `\\$`, degrees, percent) and brace `\\frac12`, so `18 dollars`, `1\\,000`,
`76^\\circ` and `50 percent` read as numbers. Everything else goes to Math-Verify as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u2013": "-",
    "\u2014": "-",
    "\u00d7": "\\times ",
    "\u00b7": "\\cdot ",
    "\u22c5": "\\cdot ",
    "\u00b0": "^\\circ",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
}

_MACRO_ALIASES = [
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), "\\frac"),
    (re.compile(r"\\(?:displaystyle|textstyle|limits)(?![a-zA-Z])"), ""),
    (re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])"), ""),
    (re.compile(r"\\(?:quad|qquad|enspace|thinspace)(?![a-zA-Z])"), " "),
    (re.compile(r"(?<!\\)\\[,;:! ]"), " "),
    (re.compile(r"\\(?:degree|circ)(?![a-zA-Z])"), "\\circ"),
]
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ")
_PERCENT_RE = re.compile(r"\\?%|\\text\{\s*percent\s*\}|\bpercent\b")
# Commands whose argument is kept as plain text.
_UNWRAP = (
    "text",
    "textbf",
    "textit",
    "textrm",
    "textnormal",
    "mathrm",
    "mathbf",
    "mathit",
    "boldsymbol",
    "mbox",
    "operatorname",
    "mathsf",
    "texttt",
    "hbox",
)
_TEXT_GROUP = r"\\(?:text|textrm|textnormal|textit|mathrm|mbox|hbox)\s*\{[^{}]*\}"
_TRAILING_UNIT_RE = re.compile(
    r"(?:\s*(?:/|\\cdot)?\s*" + _TEXT_GROUP + r"(?:\s*\^\s*\{?\s*-?\d\s*\}?)?)+\s*$"
)
_TEXT_CONTENT_RE = re.compile(r"\{([^{}]*)\}")
_UNIT_WORDS = (
    "cm|mm|km|m|meters?|metres?|kilometers?|centimeters?|inch|inches|in|feet|foot|ft|yards?|"
    "miles?|mph|units?|square units|sq units|cubic units|dollars?|cents?|degrees?|deg|"
    "radians?|rad|seconds?|sec|s|minutes?|min|hours?|hrs?|h|days?|weeks?|months?|years?|"
    "grams?|g|kg|kilograms?|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|people|"
    "students|ways|points?|times|marbles|coins|apples"
)
_PLAIN_UNIT_RE = re.compile(
    r"^(-?[\d.,]+(?:/\d+)?)\s*(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?[23]\}?)?\.?$", re.I
)
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class Normalized:
    """A normalised answer string and whether a percent sign was dropped from it."""

    text: str
    percent: bool


def _group_end(s: str, start: int) -> int:
    """Index just past the brace group opening at `s[start]` (len(s) if unclosed)."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(s)


def _unwrap_commands(s: str) -> str:
    """`\\text{abc}` -> `abc` (brace-matched, so nested groups survive)."""
    pattern = re.compile(r"\\(" + "|".join(_UNWRAP) + r")\s*\{")
    for _ in range(50):  # bounded: each pass removes one command
        m = pattern.search(s)
        if m is None:
            break
        end = _group_end(s, m.end() - 1)
        inner = s[m.end() : end - 1]
        s = s[: m.start()] + inner + s[end:]
    return s


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """One macro argument at `s[i:]`: a brace group, a `\\command`, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        end = _group_end(s, i)
        return s[i + 1 : end - 1], end
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
        return None
    if s[i].isalnum():
        return s[i], i + 1
    return None


def _brace_macro_args(s: str, name: str, nargs: int) -> str:
    """Give every argument of `\\name` braces: `\\frac12` -> `\\frac{1}{2}`."""
    out, i, token = [], 0, "\\" + name
    while True:
        j = s.find(token, i)
        if j < 0 or (j + len(token) < len(s) and s[j + len(token)].isalpha()):
            if j < 0:
                out.append(s[i:])
                break
            out.append(s[i : j + len(token)])
            i = j + len(token)
            continue
        out.append(s[i : j + len(token)])
        k = j + len(token)
        args = []
        for _ in range(nargs):
            arg = _read_arg(s, k)
            if arg is None:
                break
            args.append(arg[0])
            k = arg[1]
        if len(args) == nargs:
            out.append("".join("{" + a + "}" for a in args))
            i = k
        else:
            i = j + len(token)
    return "".join(out)


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and _group_end(s, 0) == len(s):
        s = s[1:-1].strip()
    return s


def _collapse_spaces(s: str) -> str:
    """Drop whitespace except between two letters (keeps `\\pi r`, `no solution`)."""
    s = _SPACE_RE.sub(" ", s)
    return re.sub(r"(?<![a-zA-Z]) | (?![a-zA-Z])", "", s)


def normalize(answer: str) -> Normalized:
    """Canonical string form of one answer; see the module docstring for what is unified."""
    s = answer.strip()
    for src, dst in _UNICODE.items():
        s = s.replace(src, dst)
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "")
    if s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    for pattern, repl in _MACRO_ALIASES:
        s = pattern.sub(lambda _, r=repl: r, s)
    s = s.replace("~", " ").replace("{,}", ",")

    percent = bool(_PERCENT_RE.search(s))
    s = _PERCENT_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    stripped = _TRAILING_UNIT_RE.sub("", s).strip()
    if stripped and re.search(r"[\d}]$", stripped):  # "5\text{ cm}^2" -> "5"; keep "\text{(A)}"
        s = stripped
    s = _unwrap_commands(s).strip()
    m = _PLAIN_UNIT_RE.match(s)
    if m:
        s = m.group(1)

    s = s.strip().rstrip(".").strip().lstrip(":").strip()
    s = _brace_macro_args(s, "frac", 2)
    s = _collapse_spaces(s)
    s = re.sub(r"(\d)\.0+(?!\d)", r"\1", s)
    s = _strip_outer_braces(s)
    return Normalized(s, percent)
