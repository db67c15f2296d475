"""Names made from user text (room titles, the Space's display name): one visible line.

Invisible characters in a name let one room pass for another in a room list: bidi overrides
and isolates reorder what is shown, zero-width characters hide inside it, control characters
and line breaks garble it. `clean_name` drops them and collapses whitespace, so a name shows
what it says.
"""

from __future__ import annotations

import unicodedata

# Unicode categories never shown as a glyph: controls (Cc), formatting (Cf: bidi marks,
# overrides and isolates, zero-width spaces and joiners, the BOM…) and lone surrogates (Cs).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})
# Letters by category that render as nothing: Hangul fillers, a known way to fake an empty name.
_BLANK_LETTERS = frozenset({"\u115f", "\u1160", "\u3164", "\uffa0"})


def _shown(char: str) -> str:
    """What of `char` a name keeps: a space for any whitespace, nothing for the invisible."""
    if char.isspace():  # before the categories: line breaks and tabs are controls (Cc) too
        return " "
    if char in _BLANK_LETTERS or unicodedata.category(char) in _INVISIBLE_CATEGORIES:
        return ""
    return char


def clean_name(text: str) -> str:
    """`text` as a one-line name: invisible characters removed, whitespace runs made one space,
    no leading or trailing space. Cleaning a clean name changes nothing."""
    return " ".join("".join(map(_shown, text)).split())
