"""Tokens as pieces of the text they came from, and words made of tokens.

A *piece* is the slice of the original text that a token covers, with the whitespace before it:
``"".join(pieces)`` gives the text back exactly (the tokens the tokenizer added, such as
``[CLS]`` or ``<s>``, are *special*: their piece is the token as the tokenizer spells it and
they are left out of the text). The pieces come from a fast tokenizer's character offsets;
tokens without offsets (token ids given without a text, a continuation, generated tokens) are
decoded one after the other (each piece is what the token adds to the decoded text), and
without a tokenizer the tokenizer markers are read (:func:`lrp_explicit.tokens.clean_tokens`).

A *word* is a run of tokens with the same ``word_ids()`` entry of a fast tokenizer (one
pre-tokenizer word: ``"encoder"`` for ``en ##code ##r``, ``" Paris"`` for ``ĠPar is``); where
there are no word ids, a piece that starts with whitespace starts a word. A special token is a
word of its own. The relevance of a word is the sum of its tokens' relevance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..tokens import clean_tokens

__all__ = ["TokenText", "token_text", "extend_text", "join_text", "word_groups", "sum_words"]


@dataclass
class TokenText:
    """Display text of each token of an input.

    Attributes
    ----------
    pieces : list of str
        One string per token (see the module's description).
    words : list of int
        The index of the word each token belongs to (non-decreasing from 0).
    special : list of bool
        Which tokens the tokenizer added (``[CLS]``, ``[SEP]``, ``<s>``, ``</s>`` …).
    """

    pieces: list[str]
    words: list[int]
    special: list[bool]


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def token_text(tokenizer: Any, texts: Sequence[str] | None, ids: Sequence[int],
               tokens: Sequence[str]) -> TokenText:
    """Pieces, words and special flags of the tokens ``ids`` of ``texts``.

    Parameters
    ----------
    tokenizer : tokenizer or None
        With a fast tokenizer and the texts, the pieces are slices of the texts (offsets) and
        the words follow ``word_ids()``.
    texts : sequence of str or None
        The text, or the pair of texts, that was tokenised as ``tokenizer(*texts)`` into
        ``ids``; ``None`` when the input was token ids.
    ids : sequence of int
        The token ids.
    tokens : sequence of str
        The tokens as the tokenizer spells them (``str(id)`` without a tokenizer).

    Returns
    -------
    TokenText
    """
    if texts is not None and getattr(tokenizer, "is_fast", False):
        found = _from_offsets(tokenizer, list(texts), list(ids), list(tokens))
        if found is not None:
            return found
    return extend_text(tokenizer, TokenText([], [], []), [], list(ids), list(tokens))


def _from_offsets(tokenizer: Any, texts: list[str], ids: list[int],
                  tokens: list[str]) -> TokenText | None:
    try:
        enc = tokenizer(*texts, return_offsets_mapping=True, return_special_tokens_mask=True)
        sequences, word_ids = enc.sequence_ids(), enc.word_ids()
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return None
    if list(enc["input_ids"]) != ids:
        return None
    offsets, mask = enc["offset_mapping"], enc["special_tokens_mask"]
    special = [bool(m) or s is None for m, s in zip(mask, sequences)]
    pieces: list[str] = []
    ends = [0] * len(texts)
    last: dict[int, int] = {}
    for k, ((start, end), seq) in enumerate(zip(offsets, sequences)):
        if special[k]:
            pieces.append(tokens[k])
            continue
        text = texts[seq]
        pieces.append(text[ends[seq]:end] if end >= ends[seq] else "")
        ends[seq] = max(ends[seq], end)
        last[seq] = k
    for seq, k in last.items():  # what follows the last token (trailing spaces) joins it
        pieces[k] += texts[seq][ends[seq]:]
    words, keys = [], []
    for k in range(len(ids)):
        key = None if special[k] or word_ids[k] is None else (sequences[k], word_ids[k])
        same = k > 0 and key is not None and key == keys[-1]
        words.append(words[-1] if same else (words[-1] + 1 if words else 0))
        keys.append(key)
    return TokenText(pieces, words, special)


def extend_text(tokenizer: Any, known: TokenText, known_ids: Sequence[int],
                ids: Sequence[int], tokens: Sequence[str]) -> TokenText:
    """``known`` (the text of ``known_ids``) extended by the tokens ``ids`` that follow.

    Each new piece is what its token adds to the decoded text of the tokens before it (the
    tokenizer's own decoding, so byte-level and SentencePiece spaces come out right); where
    decoding cannot tell (a token that ends inside a character), or without a tokenizer, the
    tokenizer markers are read. A new piece that starts with whitespace, or follows a special
    token, starts a word; special tokens are words of their own.

    Parameters
    ----------
    tokenizer : tokenizer or None
    known : TokenText
        The pieces so far (may be empty).
    known_ids : sequence of int
        The ids of ``known``.
    ids, tokens : sequence
        The ids that follow and their tokens as the tokenizer spells them.

    Returns
    -------
    TokenText
        A new object; ``known`` is not changed.
    """
    pieces, words, special = list(known.pieces), list(known.words), list(known.special)
    everything = list(known_ids) + list(ids)
    specials = _special_ids(tokenizer) if tokenizer is not None else set()
    marked = clean_tokens(tokens) if tokens else []
    for k, (index, token) in enumerate(zip(ids, tokens)):
        at = len(known_ids) + k
        is_special = index in specials
        piece = token if is_special else _decoded_piece(tokenizer, everything, at)
        if piece is None:
            piece = marked[k] if not (at == 0 and marked[k][:1].isspace()) else marked[k][1:]
        starts = (not words or is_special or special[-1] or piece[:1].isspace()
                  or tokenizer is None)
        words.append(words[-1] + 1 if words and starts else (words[-1] if words else 0))
        pieces.append(piece)
        special.append(is_special)
    return TokenText(pieces, words, special)


def join_text(parts: Sequence[TokenText | None]) -> TokenText | None:
    """The texts of inputs shown one after the other (the two texts of a pair), words kept
    apart; ``None`` if one of them is."""
    if any(p is None for p in parts):
        return None
    out = TokenText([], [], [])
    for part in parts:
        start = out.words[-1] + 1 if out.words else 0
        out.pieces += part.pieces  # type: ignore[union-attr]
        out.words += [start + w for w in part.words]  # type: ignore[union-attr]
        out.special += part.special  # type: ignore[union-attr]
    return out


#: Tokens decoded before the one whose piece is read (enough for any decoder's context).
_WINDOW = 8


def _decoded_piece(tokenizer: Any, ids: list[int], at: int) -> str | None:
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return None
    start = max(0, at - _WINDOW)
    try:
        before = tokenizer.decode(ids[start:at], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
        upto = tokenizer.decode(ids[start:at + 1], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError):
        return None
    if not upto.startswith(before) or "\ufffd" in upto[len(before):]:
        return None
    return upto[len(before):]


def word_groups(words: Sequence[int]) -> list[list[int]]:
    """The token indices of each word, from the word index of each token."""
    groups: list[list[int]] = []
    for k, w in enumerate(words):
        if not groups or w != words[groups[-1][0]]:
            groups.append([])
        groups[-1].append(k)
    return groups


def sum_words(relevance: Tensor, words: Sequence[int], dim: int = -1) -> Tensor:
    """The relevance of each word: the sum of its tokens' relevance along ``dim``."""
    index = torch.as_tensor(list(words), dtype=torch.long, device=relevance.device)
    dim = dim % relevance.dim()
    if index.numel() != relevance.shape[dim]:
        raise ValueError(f"{index.numel()} word indices for {relevance.shape[dim]} tokens")
    count = int(index.max()) + 1 if index.numel() else 0
    shape = list(relevance.shape)
    shape[dim] = count
    out = relevance.new_zeros(shape)
    return out.index_add(dim, index, relevance)
