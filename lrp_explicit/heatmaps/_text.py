"""Display pieces → what a renderer draws: whitespace (unpainted), the painted body, line breaks."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..tokens import NEWLINE_MARK


@dataclass(frozen=True)
class Chunk:
    """One drawable part of a display piece.

    ``lead`` is the whitespace before the body (not painted: a line may break there), ``body``
    the painted text, ``newline`` whether a line break follows (the body then ends with
    :data:`NEWLINE_MARK`, so that the newline's own relevance stays visible).
    """

    lead: str
    body: str
    newline: bool


#: Control characters (C0 but tab and line breaks, DEL, C1) and the bidirectional formatting
#: characters: a token holding them could move the cursor, clear or retitle a terminal, or
#: reorder what is shown.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, lines: bool = True) -> str:
    """``text`` with control characters shown as escapes (``"\\x1b"`` → ``\\x1b``), so that no
    token reaches a terminal, page or document as a control sequence; with ``lines=False``
    also tabs and line breaks (one-line labels and titles)."""
    text = _CONTROL.sub(_escape, str(text))
    if not lines:
        text = text.replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")
    return text


def chunks(piece: str) -> list[Chunk]:
    """Split a display piece (leading whitespace included, ``"\\n"`` possible) into chunks.

    A piece of whitespace only (no newline) keeps it as its painted body, so that the token
    still shows; an empty piece gives one empty chunk. Control characters are shown as
    escapes (:func:`visible`).
    """
    piece = visible(piece).replace("\r\n", "\n").replace("\r", "\n")
    parts = piece.split("\n")
    out = []
    for k, part in enumerate(parts):
        body = part.lstrip(" \t\u00a0")
        lead = part[:len(part) - len(body)]
        last = k == len(parts) - 1
        if not last:
            out.append(Chunk(lead, body + NEWLINE_MARK, True))
        elif body or len(parts) == 1:
            if not body and len(parts) == 1:  # whitespace only: paint it
                lead, body = "", part
            out.append(Chunk(lead, body, False))
        elif lead:  # whitespace after the last newline: indentation of the next line
            out.append(Chunk(lead, "", False))
    return out


def groups(n: int, segments: Sequence[int] | None) -> list[list[int]]:
    """Token indices grouped by segment (one paragraph per text), in the segments' order."""
    if not segments:
        return [list(range(n))]
    if len(segments) != n:
        raise ValueError(f"segments has {len(segments)} entries for {n} tokens; give one "
                         "segment index per token")
    found: dict[int, list[int]] = {}
    for i, s in enumerate(segments):
        found.setdefault(int(s), []).append(i)
    return [found[k] for k in sorted(found)]


def label(piece: str, limit: int | None = None) -> str:
    """A piece as a one-line label (rows and columns of a matrix): whitespace at the ends
    removed, newlines as :data:`NEWLINE_MARK`, whitespace-only as ``␣``; cut to ``limit``
    characters with ``…``."""
    text = visible(piece).replace("\r\n", "\n").replace("\r", "\n").replace(
        "\n", NEWLINE_MARK).replace("\t", " ")
    text = text.strip(" ") or ("␣" if piece else "∅")
    if limit is not None and len(text) > limit:
        text = text[:max(1, limit - 1)] + "…"
    return text


def check_lengths(tokens: Sequence[str], relevance_numel: int) -> None:
    """One relevance value per token, or a clear error."""
    if len(tokens) != relevance_numel:
        raise ValueError(f"{len(tokens)} tokens but {relevance_numel} relevance values; give "
                         "one value per token")
