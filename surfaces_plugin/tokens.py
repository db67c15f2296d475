"""Token counts: exact when `tiktoken` is installed, a calibrated estimate otherwise.

An exact tokenizer is optional: maubot cannot install one, and tokenizer files cannot be
downloaded at run time. The heuristic stays within about ±35% of cl100k counts.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache


def _load_exact_counter():  # noqa: ANN202 - optional dependency, used when installed
    try:
        import tiktoken  # type: ignore[import-not-found]

        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


_exact = None
_exact_checked = False

# Roughly the pieces a BPE pre-tokenizer splits text into: words, digit runs, spaces, symbols.
_PIECE = re.compile(r"[A-Za-z]+|[^\W\d_]+|\d+|\s+|_+|[^\w\s]+")
_WIDE = 0x2E80  # CJK and later blocks: about one token per character


def _piece_tokens(piece: str) -> float:
    first = piece[0]
    if first.isspace():
        # A single space joins the next word; indentation and newlines cost about one token.
        return 0 if piece == " " else math.ceil(len(piece) / 8)
    if first.isascii() and first.isalpha():
        return math.ceil(len(piece) / 8)  # common English words are one token
    if first.isdigit():
        return math.ceil(len(piece) / 3)  # cl100k splits numbers into groups of three
    if first.isalpha() or first == "_":
        wide = sum(1 for ch in piece if ord(ch) >= _WIDE)
        narrow = len(piece) - wide
        # Accented Latin and Cyrillic words split into more, shorter pieces than English.
        return math.ceil(wide * 1.2) + math.ceil(narrow / 2.5)
    ascii_symbols = sum(1 for ch in piece if ord(ch) <= 0x7F)
    # Emoji and other astral symbols take several byte-level tokens.
    other = sum(2 if ord(ch) > 0xFFFF else 1 for ch in piece if ord(ch) > 0x7F)
    return math.ceil(ascii_symbols / 2) + other


@lru_cache(maxsize=8192)
def heuristic_tokens(text: str) -> int:
    """Estimated cl100k-style token count, within about ±35% on prose, code, JSON and CJK."""
    return int(sum(_piece_tokens(m.group()) for m in _PIECE.finditer(text)))


def estimate_tokens(text: str) -> int:
    """Exact when tiktoken is installed, the heuristic otherwise."""
    global _exact, _exact_checked
    if not _exact_checked:
        _exact, _exact_checked = _load_exact_counter(), True
    if _exact is not None:
        return _exact(text)
    return heuristic_tokens(text)
