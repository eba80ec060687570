"""Prompt templates and their tokenisation with torchtune tokenizers.

The templates carry special tokens as text. torchtune's Qwen2 tokenizer maps special-token
text to single ids, but its Llama 3 (tiktoken) tokenizer encodes it as ordinary text
(``allowed_special=set()``, ``disallowed_special=()``), so :func:`tokenize_prompt` splits
the text at special tokens itself and encodes only the pieces in between, without
bos/eos (the templates write their own). This matches how Hugging Face tokenizers and
vLLM encode the same string.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

PROMPT_TEMPLATES: dict[str, str] = {
    # The SimKO paper's prompt for Qwen2.5-Math (DESIGN §1).
    "qwen_boxed": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n{problem}\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Llama 3 instruct chat format, one user turn, no system message.
    "llama3_chat": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "{problem}\n" + BOXED_INSTRUCTION + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Base-model continuation: the problem as it is.
    "plain": "{problem}",
}


def render_prompt(template: str, problem: str) -> str:
    """The prompt text for ``problem`` under template ``template`` (a key of
    :data:`PROMPT_TEMPLATES`). Plain replacement, so braces in LaTeX stay as they are."""
    if template not in PROMPT_TEMPLATES:
        raise KeyError(
            f"unknown prompt template {template!r}; known: {', '.join(sorted(PROMPT_TEMPLATES))}"
        )
    return PROMPT_TEMPLATES[template].replace("{problem}", problem)


def tokenize_prompt(tokenizer: Any, template: str, problem: str) -> list[int]:
    """Token ids of the rendered prompt: special-token text becomes its single id, the rest
    is encoded by ``tokenizer`` (a torchtune Qwen2/Qwen2.5 or Llama 3 tokenizer) with no
    added bos/eos."""
    return encode_with_special_tokens(tokenizer, render_prompt(template, problem))


def encode_with_special_tokens(tokenizer: Any, text: str) -> list[int]:
    """Encode ``text``, mapping every special-token string in it to its id."""
    special_tokens: dict[str, int] = tokenizer.special_tokens
    # Longest first, so that no special token matches as a prefix of another.
    names = sorted(special_tokens, key=len, reverse=True)
    pattern = re.compile("(" + "|".join(re.escape(name) for name in names) + ")")
    ids: list[int] = []
    for piece in pattern.split(text):
        if piece in special_tokens:
            ids.append(special_tokens[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece, add_bos=False, add_eos=False))
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a generated response: the tokenizer's own stop tokens (``<|im_end|>``,
    ``<|endoftext|>`` for Qwen; ``<|eot_id|>``, ``<|end_of_text|>``, ``<|eom_id|>`` for
    Llama 3), without duplicates or unset ids."""
    return list(dict.fromkeys(t for t in tokenizer.stop_tokens if t is not None))


def decode_responses(tokenizer: Any, responses: list[list[int]]) -> tuple[list[str], int]:
    """The text of each generated response (special tokens skipped) and how many of its ids
    the tokenizer has no token for.

    A model's vocabulary may be larger than its tokenizer's: Qwen2.5 pads its embedding to
    152,064 rows, its tokenizer ends at 151,664, and a trained model can sample a padded id.
    torchtune's decode crashes on such an id (Qwen2: ``None`` in a join; Llama 3: tiktoken's
    ``KeyError``), so it is left out of the text, as Hugging Face tokenizers (and so vLLM)
    decode it, and the response is scored as the rest reads. The count is for the logs.
    """
    has_token = _token_check(tokenizer)
    texts, unknown = [], 0
    for ids in responses:
        known = [t for t in ids if has_token(t)]
        unknown += len(ids) - len(known)
        texts.append(tokenizer.decode(known, skip_special_tokens=True))
    return texts, unknown


def _token_check(tokenizer: Any) -> Callable[[int], bool]:
    """Whether an id is one of ``tokenizer``'s tokens (ordinary or special)."""
    specials = set(tokenizer.special_tokens.values())
    if hasattr(tokenizer, "decoder"):  # torchtune's Qwen2/Qwen2.5: byte-level BPE, id -> token
        ordinary = tokenizer.decoder
        return lambda t: t in ordinary or t in specials
    if hasattr(tokenizer, "base_vocab_size"):  # torchtune's Llama 3: tiktoken ranks 0..n-1
        n = tokenizer.base_vocab_size
        return lambda t: 0 <= t < n or t in specials
    raise TypeError(
        f"cannot tell which ids a {type(tokenizer).__name__} can decode: the supported "
        "tokenizers are torchtune's Qwen2/Qwen2.5 and Llama 3 ones"
    )
