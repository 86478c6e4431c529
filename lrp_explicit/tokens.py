"""Tokens as they read: tokenizer markers (``Ġ``, ``▁``, ``##``) turned into spaces and word
joins, for heatmaps and labels."""
from __future__ import annotations

from typing import Sequence

__all__ = ["clean_tokens", "NEWLINE_MARK"]

_BYTE_LEVEL_SPACE = "Ġ"
_BYTE_LEVEL_NEWLINE = "Ċ"
_SENTENCEPIECE_SPACE = "▁"
#: Shown in place of a newline inside a token.
NEWLINE_MARK = "↵"
_NEWLINE_MARK = NEWLINE_MARK


def clean_tokens(tokens: Sequence[str]) -> list[str]:
    """Tokens as they read: tokenizer markers removed, a leading space where a word starts.

    Byte-level BPE (GPT-2, LLaMA 3: ``Ġ`` is a space, ``Ċ`` a newline), SentencePiece (``▁`` is
    a space, ``<0x0A>`` a newline) are recognised from the markers present; other tokens are
    read as WordPiece (BERT: a token starts a word unless it begins with ``##``) or plain words.
    Newlines are shown as ``↵``.

    Parameters
    ----------
    tokens : sequence of str
        Tokens as ``tokenizer.convert_ids_to_tokens`` returns them.

    Returns
    -------
    list of str
        One display string per token, in the same order.
    """
    tokens = [str(t) for t in tokens]
    joined = "".join(tokens)
    byte_level = _BYTE_LEVEL_SPACE in joined or _BYTE_LEVEL_NEWLINE in joined
    sentencepiece = not byte_level and _SENTENCEPIECE_SPACE in joined
    wordpiece = not byte_level and not sentencepiece  # or plain words: one space between
    out = []
    for i, token in enumerate(tokens):
        if byte_level:
            text = token.replace(_BYTE_LEVEL_SPACE, " ").replace(_BYTE_LEVEL_NEWLINE, "\n")
        elif sentencepiece:
            text = token.replace(_SENTENCEPIECE_SPACE, " ").replace("<0x0A>", "\n")
        elif wordpiece and token.startswith("##") and len(token) > 2:
            text = token[2:]
        elif wordpiece and i > 0:
            text = " " + token
        else:
            text = token
        out.append(text.replace("\n", _NEWLINE_MARK) or token)
    return out
