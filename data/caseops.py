#!/usr/bin/env python3
"""CaseOps: a lossless capitalization transform applied to text before SentencePiece.

    python data/caseops.py encode < book.txt > book.caseops.txt
    python data/caseops.py decode < book.caseops.txt          # gives book.txt back, byte for byte

The 2026-04-27 record (val_bpb 1.0611) tokenizes FineWeb this way ("lossless_caps_caseops_v1"):
capital letters are taken out of the words and said once, by an operator character in front,
so "The", "THE" and "the" share the pieces of "the". Four private-use characters are the operators:

    TITLE   U+E001  before a word whose first letter is a capital: "Paris" -> TITLE "paris"
    ALLCAPS U+E002  before a word of two or more letters, all capitals: "NASA" -> ALLCAPS "nasa"
    CAPNEXT U+E003  before each later capital of any other word: "McDonald" -> TITLE "mc" CAPNEXT "donald",
                    "iPhone" -> "i" CAPNEXT "phone"
    ESC     U+E004  before an operator character that is part of the text itself: U+E001 -> ESC U+E001

A word is a maximal run of ASCII letters A-Z/a-z; nothing else changes (digits, punctuation, and
letters outside ASCII such as "Ä", "Σ" or "İ" keep their case). A single capital letter is a
TITLE word ("I" -> TITLE "i"). `decode` inverts `encode` exactly and refuses text that `encode`
cannot produce.

The published tokenizer for it, fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model, holds
the four operators as user-defined pieces (one token each). val_bpb must still divide by the bytes
of the original text, so `original_byte_counts` gives, per token, how many bytes of the original
(untransformed) text it stands for; data/build_shards.py writes them beside the validation shards.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

NAME = "lossless_caps_caseops_v1"
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_BYTES = 3  # each is 3 bytes of UTF-8
# What encode rewrites: an ASCII word, or an operator character that occurs in the text.
ENCODE_UNIT = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# What decode undoes, each operator acting on what follows it: an escaped operator, TITLE or CAPNEXT and
# the letter it capitalizes, ALLCAPS and the word; any other operator is an error.
DECODE_UNIT = re.compile("\ue004([\ue001-\ue004])|[\ue001\ue003]([a-z])|\ue002([a-z]+)|[\ue001-\ue004]")


def encode_word(word: str) -> str:
    """One maximal run of ASCII letters, with its capitals moved into operators."""
    lower = word.lower()
    if word == lower:
        return word
    if len(word) > 1 and word.isupper():
        return ALLCAPS + lower
    if word[1:] == lower[1:]:  # only the first letter is a capital (or the word is one capital)
        return TITLE + lower
    head = TITLE + lower[0] if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`: lowercase ASCII words led by operators, operators in the text escaped."""
    return ENCODE_UNIT.sub(lambda m: ESC + m[0] if m[0] in OPERATORS else encode_word(m[0]), text)


def _decode_unit(match: re.Match) -> str:
    escaped, letter, word = match.groups()
    if escaped or letter or word:
        return escaped or (letter or word).upper()
    wanted = "an operator character" if match[0] == ESC else "a lowercase ASCII letter"
    raise ValueError(f"operator U+{ord(match[0]):04X} at {match.start()} is not followed by {wanted}")


def decode(text: str, strict: bool = True) -> str:
    """The original text of `encode`'s output; ValueError for text that `encode` cannot produce. strict=False
    only undoes the operators, for text that passed through a tokenizer: NFKC may have made capitals without
    operators ("™" is "TM"), which encode would have marked."""
    original = DECODE_UNIT.sub(_decode_unit, text)
    if strict and encode(original) != text:  # e.g. ALLCAPS before one letter, TITLE inside a word
        raise ValueError("not CaseOps text: its operators are not the ones encode would write")
    return original


# ---------------------------------------------------------------------------------------
# Per-token original bytes. val_bpb's bytes are those of the text as the tokenizer normalizes
# it (CHALLENGE.md: the UTF-8 length of sp.decode(ids), so a run of whitespace counts 1 and
# NFKC's forms count as what they become). A token of CaseOps text stands for the same bytes
# as that piece in untransformed text, except that an operator stands for none: its 3 bytes
# were never in the original. An escaped operator (ESC then the operator's own piece) is text:
# ESC counts 0, the escaped character its 3 bytes. Capitals and lowercase ASCII letters are one
# byte alike, so the lowercase pieces count what their capitals would have.
# ---------------------------------------------------------------------------------------


def operator_ids(processor) -> list[int]:
    """The ids of TITLE, ALLCAPS, CAPNEXT and ESC; ValueError when the tokenizer lacks them as pieces."""
    ids = [processor.piece_to_id(op) for op in OPERATORS]
    missing = [f"U+{ord(op):04X}" for op, i in zip(OPERATORS, ids) if i == processor.unk_id()]
    if missing:
        raise ValueError(f"no piece for the CaseOps operator(s) {', '.join(missing)}: not a CaseOps tokenizer")
    return ids


def piece_byte_table(processor) -> np.ndarray:
    """Bytes of normalized original text per token id: the challenge's count (a leading "▁" is its space,
    byte-fallback pieces 1, control/unknown/unused 0), with the four operators at 0. val_bpb counts a leading
    "▁" only after a non-control token; a document's first piece never has one (leading whitespace is removed
    and there is no dummy prefix), so here it always counts."""
    table = np.zeros(processor.vocab_size(), dtype=np.int64)
    for i in range(processor.vocab_size()):
        if processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i):
            continue
        table[i] = 1 if processor.is_byte(i) else len(processor.id_to_piece(i).replace("▁", " ").encode("utf-8"))
    table[operator_ids(processor)] = 0
    return table


def original_byte_counts(ids, table: np.ndarray, op_ids: list[int]) -> np.ndarray:
    """Per token of one document (BOS not included), the bytes of original text it stands for; `table` is
    piece_byte_table's, `op_ids` operator_ids' (ESC last)."""
    ids, esc_id = np.asarray(ids, dtype=np.int64), op_ids[-1]
    counts = table[ids]
    if not np.any(ids == esc_id):
        return counts
    escape_at = None  # position of an ESC token that escapes the token after it
    for pos in np.flatnonzero(np.isin(ids, op_ids)).tolist():
        if escape_at is not None:
            if pos != escape_at + 1:
                raise ValueError(f"the ESC token at {escape_at} is not followed by an operator token")
            counts[pos], escape_at = OPERATOR_BYTES, None  # the operator character is text here
        elif ids[pos] == esc_id:
            escape_at = pos
    if escape_at is not None:
        raise ValueError(f"the ESC token at {escape_at} ends the document")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caseops.py", description="CaseOps-encode or decode UTF-8 text, stdin to stdout.")
    p.add_argument("direction", choices=("encode", "decode"), help="encode: text to CaseOps; decode: back")
    args = p.parse_args(argv)
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
        result = encode(text) if args.direction == "encode" else decode(text)
    except ValueError as exc:  # UnicodeDecodeError is one too
        print(f"caseops.py: error: stdin: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(result.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
