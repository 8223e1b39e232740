#!/usr/bin/env python3
"""Build challenge-format token shards from your own documents.

    python data/build_shards.py --input books/ --val-fraction 0.05 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --out data/datasets/books_sp1024

Input documents come from `.jsonl` / `.jsonl.zst` files (one JSON object per line, the
document in its `text` field), `.txt` files (one file = one document) or folders of those
(read recursively, in sorted path order). The output folder has the layout `train_gpt.py`
reads through DATA_PATH, the same as the published challenge data:

    fineweb_train_000000.bin ...   training split, --shard-tokens tokens per file
    fineweb_val_000000.bin ...     validation split
    summary.json                   documents / tokens / text bytes per split, each shard's tokens,
                                   bytes and sha256, inputs, tokenizer (with its sha256)
    tokenizer.model, .vocab        only when --vocab-size trains a new tokenizer
    fineweb_val_bytes_000000.bin   only with --transform caseops: per-token byte counts (below)

Shard format: 256 little-endian int32 header words ([0]=20240520, [1]=1, [2]=token count,
the rest 0), then the tokens as little-endian uint16, so a file is 1024 + 2*count bytes.
Every document is written as BOS (id 1) followed by its tokens, no EOS, the way the
challenge data is laid out. A document may continue from one shard into the next.

The validation split is chosen by document, never by token: the first N documents
(--val-docs, the rule the challenge uses for its own val split), an evenly spread fraction
(--val-fraction F puts document i in val when floor((i+1)*F) > floor(i*F), so exactly
floor(n*F) documents spread over the whole input), or separate files (--val).

Tokenizing runs in --workers processes over batches of documents; results are written in
input order, so the output bytes do not depend on the number of workers. Everything is
written into a temporary folder beside --out and renamed into place when complete; an
existing non-empty --out is only replaced with --force, and only after the new one is done.

A new tokenizer (--vocab-size) is a SentencePiece BPE model trained on the training
documents only, with the settings of the challenge tokenizers (NFKC, no dummy prefix,
split digits, pad=0 bos=1 eos=2 unk=3) and byte fallback, so that no character becomes
<unk>. The build checks that it has a standalone "▁" piece: without one a lone space would
fall back to the three UTF-8 bytes of "▁" and val_bpb byte counting would be wrong.

--transform caseops rewrites every document with CaseOps (data/caseops.py: capitals become
operator characters U+E001..U+E004, losslessly) before encoding it; --tokenizer must then be a
CaseOps model such as fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model. The operators
are not text, so the validation split gets byte sidecars: fineweb_val_bytes_XXXXXX.bin beside
each fineweb_val_XXXXXX.bin, the same format and token count, holding per token (uint16) the
bytes of original text it stands for, counted as val_bpb counts them for an untransformed
tokenizer (the normalized text: a whitespace run is 1 byte; BOS and operators 0). A document's
sidecar total is the UTF-8 length of its text as SentencePiece normalizes it.

Exit status: 0 done, 1 bad input data or I/O failure, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import fractions
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import caseops  # data/caseops.py, beside this script

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
BOS_ID = 1
DEFAULT_SHARD_TOKENS = 100_000_000
INPUT_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
PROG = "build_shards.py"
TRANSFORMS = ("none", "caseops")


class UsageError(Exception):
    """An argument is wrong: exit 2 before anything is written."""


class InputError(Exception):
    """The input data is wrong (bad JSON line, missing field, bad UTF-8): exit 1."""


# ---------------------------------------------------------------------------------------
# Reading documents. Each reader yields the text of one document at a time and raises
# InputError naming file:line for anything it cannot use.
# ---------------------------------------------------------------------------------------


def has_input_suffix(path: Path) -> bool:
    return path.name.endswith(INPUT_SUFFIXES)


def expand_inputs(paths: list[str], flag: str) -> list[Path]:
    """Turn --input/--val arguments into the ordered list of document files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and has_input_suffix(p))
            if not found:
                raise UsageError(f"{flag} {raw}: folder holds no .jsonl, .jsonl.zst or .txt files")
            files.extend(found)
        elif path.is_file():
            if not has_input_suffix(path):
                raise UsageError(f"{flag} {raw}: unsupported file type (use .jsonl, .jsonl.zst or .txt)")
            files.append(path)
        else:
            raise UsageError(f"{flag} {raw}: no such file or folder")
    return files


class ByteCounter(io.RawIOBase):
    """Wraps a raw file so that progress can report how much of the input was consumed."""

    def __init__(self, raw, on_read):
        self.raw, self.on_read = raw, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.on_read(n or 0)
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_binary(path: Path, on_read) -> io.BufferedReader:
    counted = io.BufferedReader(ByteCounter(open(path, "rb"), on_read), 1 << 20)
    if path.name.endswith(".zst"):
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(counted, read_across_frames=True)
        return io.BufferedReader(stream, 1 << 20)
    return counted


def read_jsonl(path: Path, text_field: str, on_read) -> Iterator[str]:
    import zstandard

    with open_binary(path, on_read) as lines:
        lineno = 0
        try:
            for lineno, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                yield parse_json_line(raw, text_field, f"{path}:{lineno}")
        except zstandard.ZstdError as exc:
            raise InputError(f"{path}: corrupt zstd data after line {lineno}: {exc}") from None


def parse_json_line(raw: bytes, text_field: str, where: str) -> str:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with a {text_field!r} field")
    if text_field not in record:
        raise InputError(f"{where}: no {text_field!r} field (keys: {', '.join(sorted(record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def read_txt(path: Path, on_read) -> Iterator[str]:
    with open_binary(path, on_read) as f:
        data = f.read()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_documents(files: list[Path], text_field: str, on_read) -> Iterator[str]:
    for path in files:
        try:
            if path.name.endswith(".txt"):
                yield from read_txt(path, on_read)
            else:
                yield from read_jsonl(path, text_field, on_read)
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------
# Validation split: which documents go to val. Pure functions of the document index.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitRule:
    kind: str  # "first", "fraction" or "separate"
    val_docs: int = 0
    fraction: fractions.Fraction = fractions.Fraction(0)

    def is_val(self, index: int) -> bool:
        if self.kind == "first":
            return index < self.val_docs
        if self.kind == "fraction":
            f = self.fraction
            return (index + 1) * f.numerator // f.denominator > index * f.numerator // f.denominator
        return False

    def describe(self) -> str:
        if self.kind == "first":
            return f"the first {self.val_docs} documents of the input"
        if self.kind == "fraction":
            return f"every document i with floor((i+1)*{self.fraction}) > floor(i*{self.fraction})"
        return "the documents of --val"


def labelled_documents(train_files, val_files, rule, text_field, on_read) -> Iterator[tuple[str, str]]:
    """Yield (split, text) for every document, in input order (val files last)."""
    for index, text in enumerate(read_documents(train_files, text_field, on_read)):
        yield ("val" if rule.is_val(index) else "train"), text
    for text in read_documents(val_files, text_field, on_read):
        yield "val", text


# ---------------------------------------------------------------------------------------
# Tokenizing in worker processes. A batch is a list of (split, text); the result keeps,
# per split, the concatenated BOS+tokens of its documents in input order, and with CaseOps
# the validation tokens' original byte counts, aligned with them (0 for BOS).
# ---------------------------------------------------------------------------------------

_PROCESSOR = None
_CASEOPS = None  # (byte table, operator ids) when documents are CaseOps-transformed


def init_worker(model_proto: bytes, transform: str) -> None:
    global _PROCESSOR, _CASEOPS
    import sentencepiece as spm

    _PROCESSOR = spm.SentencePieceProcessor(model_proto=model_proto)
    if transform == "caseops":
        _CASEOPS = (caseops.piece_byte_table(_PROCESSOR), caseops.operator_ids(_PROCESSOR))


@dataclass
class BatchResult:
    tokens: dict[str, np.ndarray]
    documents: dict[str, int]
    text_bytes: dict[str, int]
    original_bytes: np.ndarray | None = None  # CaseOps only: per val token, aligned with tokens["val"]


def with_bos(parts: list[tuple[int, list]]) -> np.ndarray:
    """The (first, rest) pairs laid end to end: BOS then a document's tokens, or 0 then their byte counts."""
    flat = np.empty(sum(len(rest) + 1 for _, rest in parts), dtype="<u2")
    pos = 0
    for first, rest in parts:
        flat[pos] = first
        flat[pos + 1 : pos + 1 + len(rest)] = rest
        pos += 1 + len(rest)
    return flat


def encode_batch(batch: list[tuple[str, str]]) -> BatchResult:
    texts = [caseops.encode(text) if _CASEOPS else text for _, text in batch]
    encoded = _PROCESSOR.encode(texts, num_threads=1)
    result = BatchResult({}, {}, {})
    for split in ("train", "val"):
        picked = [i for i, (s, _) in enumerate(batch) if s == split]
        if not picked:
            continue
        result.tokens[split] = with_bos([(BOS_ID, encoded[i]) for i in picked])
        result.documents[split] = len(picked)
        result.text_bytes[split] = sum(len(batch[i][1].encode("utf-8")) for i in picked)
        if split == "val" and _CASEOPS:
            table, op_ids = _CASEOPS
            result.original_bytes = with_bos([(0, caseops.original_byte_counts(encoded[i], table, op_ids))
                                              for i in picked])
            assert len(result.original_bytes) == len(result.tokens[split])
    return result


def make_batches(docs: Iterable[tuple[str, str]], batch_bytes: int) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for split, text in docs:
        batch.append((split, text))
        size += len(text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_in_order(batches: Iterator[list], model_proto: bytes, transform: str,
                    workers: int) -> Iterator[BatchResult]:
    """Encode batches with `workers` processes, yielding results in input order.

    At most 2*workers batches are in flight, so memory stays bounded on any corpus size.
    """
    if workers == 1:
        init_worker(model_proto, transform)
        yield from map(encode_batch, batches)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=init_worker,
                                                  initargs=(model_proto, transform))
    try:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.submit(encode_batch, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# Writing shards: a stream of tokens cut into files of exactly shard_tokens tokens
# (the last one shorter). The header's count is filled in when a file is closed.
# ---------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    shards: list = field(default_factory=list)
    original_bytes: int | None = None  # CaseOps val split: the byte sidecars' total
    byte_shards: list | None = None  # and their files


class ShardWriter:
    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.stats = SplitStats()
        self.file = None
        self.in_file = 0

    def _open_next(self) -> None:
        name = f"fineweb_{self.split}_{len(self.stats.shards):06d}.bin"
        self.file = open(self.folder / name, "wb")
        self.file.write(np.zeros(HEADER_WORDS, dtype="<i4").tobytes())
        self.stats.shards.append({"file": name, "tokens": 0})
        self.in_file = 0

    def _close_current(self) -> None:
        header = np.zeros(HEADER_WORDS, dtype="<i4")
        header[:3] = (SHARD_MAGIC, SHARD_VERSION, self.in_file)
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.close()
        self.stats.shards[-1]["tokens"] = self.in_file
        self.stats.shards[-1]["bytes"] = HEADER_WORDS * 4 + 2 * self.in_file
        self.stats.shards[-1]["sha256"] = file_sha256(self.folder / self.stats.shards[-1]["file"])  # preflight checks it
        self.file = None

    def add(self, tokens: np.ndarray, documents: int, text_bytes: int) -> None:
        self.stats.documents += documents
        self.stats.text_bytes += text_bytes
        self.stats.tokens += len(tokens)
        while len(tokens):
            if self.file is None:
                self._open_next()
            take = min(len(tokens), self.shard_tokens - self.in_file)
            self.file.write(tokens[:take].tobytes())
            self.in_file += take
            tokens = tokens[take:]
            if self.in_file == self.shard_tokens:
                self._close_current()

    def close(self) -> SplitStats:
        if self.file is not None:
            self._close_current()
        return self.stats


# ---------------------------------------------------------------------------------------
# Progress: one line on stderr every few seconds while reading and tokenizing.
# ---------------------------------------------------------------------------------------


class Progress:
    def __init__(self, total_input_bytes: int, every_s: float = 5.0):
        self.total, self.every_s = max(total_input_bytes, 1), every_s
        self.read = 0
        self.start = self.last = time.monotonic()

    def on_read(self, n: int) -> None:
        self.read += n

    def report(self, writers: dict[str, ShardWriter], final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        docs = sum(w.stats.documents for w in writers.values())
        tokens = sum(w.stats.tokens for w in writers.values())
        mb = sum(w.stats.text_bytes for w in writers.values()) / 1e6
        elapsed = max(now - self.start, 1e-9)
        print(
            f"  {min(self.read / self.total, 1.0):6.1%} of input  {docs:,} docs  {mb:,.1f} MB text  "
            f"{tokens:,} tokens  {mb / elapsed:.1f} MB/s",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------------
# Tokenizer: load an existing SentencePiece model, or train a BPE one with byte fallback.
# ---------------------------------------------------------------------------------------


def load_tokenizer(path: str):
    import sentencepiece as spm

    model = Path(path)
    if not model.is_file():
        raise UsageError(f"--tokenizer {path}: no such file")
    try:
        processor = spm.SentencePieceProcessor(model_file=str(model))
    except (RuntimeError, OSError) as exc:
        raise UsageError(f"--tokenizer {path}: not a SentencePiece model ({exc})") from None
    check_tokenizer(processor, f"--tokenizer {path}")
    return processor


def check_tokenizer(processor, where: str) -> None:
    if processor.vocab_size() > 65536:
        raise UsageError(f"{where}: vocab size {processor.vocab_size()} does not fit uint16 shards")
    if processor.bos_id() != BOS_ID:
        raise UsageError(f"{where}: BOS id is {processor.bos_id()}, the shard format needs {BOS_ID}")


def training_lines(docs: Iterable[tuple[str, str]], max_bytes: int, every_s: float = 5.0) -> Iterator[str]:
    """Lines of the training documents, up to max_bytes of text: SentencePiece's sentences."""
    used, last = 0, time.monotonic()
    for split, text in docs:
        if split != "train":
            continue
        for line in text.split("\n"):
            if line.strip():
                yield line
                used += len(line)
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            print(f"  read {used / 1e6:,.1f} MB of tokenizer training text", file=sys.stderr, flush=True)
        if used >= max_bytes:
            break
    print(f"  training on {used / 1e6:,.1f} MB of text ...", file=sys.stderr, flush=True)


def train_tokenizer(lines: Iterator[str], vocab_size: int):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(20240520)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.999,
            split_digits=True,
            add_dummy_prefix=False,
            normalization_rule_name="nmt_nfkc",
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            hard_vocab_limit=False,
            max_sentence_length=1 << 16,
            # A constant, not --workers: the model file records it, and the output must not
            # depend on the worker count. BPE training gains little from threads anyway.
            num_threads=16,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise UsageError(f"--vocab-size {vocab_size}: SentencePiece training failed: {exc}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    space = processor.piece_to_id("▁")
    if space == processor.unk_id():
        raise InputError("trained tokenizer has no standalone '▁' piece; the training text has no spaces?")
    if sum(processor.is_byte(i) for i in range(processor.vocab_size())) != 256:
        raise InputError("trained tokenizer is missing byte-fallback pieces")
    return processor


def save_tokenizer(processor, folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(processor.serialized_model_proto())
    with open(folder / "tokenizer.vocab", "w", encoding="utf-8") as f:
        for i in range(processor.vocab_size()):
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")


# ---------------------------------------------------------------------------------------
# The output folder: built under a temporary name beside --out, renamed when complete.
# ---------------------------------------------------------------------------------------


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: folder exists and is not empty (use --force to replace it)")


def publish(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def describe_transform(transform: str) -> dict:
    if transform == "none":
        return {"name": "none"}
    return {
        "name": caseops.NAME,
        "operators": dict(zip(("TITLE", "ALLCAPS", "CAPNEXT", "ESC"),
                              (f"U+{ord(op):04X}" for op in caseops.OPERATORS))),
        "val_byte_sidecars": "fineweb_val_bytes_NNNNNN.bin beside each fineweb_val_NNNNNN.bin, same header and "
        "count: per token (uint16) the bytes of original text it stands for, as val_bpb counts the normalized "
        "text (BOS and operators 0); split val's original_bytes is their total",
    }


def split_summary(s: SplitStats) -> dict:
    summary = {"documents": s.documents, "tokens": s.tokens, "bos_tokens": s.documents, "text_bytes": s.text_bytes,
               "shards": s.shards}
    if s.original_bytes is not None:
        summary.update(original_bytes=s.original_bytes, byte_shards=s.byte_shards)
    return summary


def write_summary(folder: Path, args, tokenizer_info: dict, rule: SplitRule, stats: dict) -> None:
    summary = {
        "format": {
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "header_bytes": HEADER_WORDS * 4,
            "token_dtype": "uint16 little-endian",
            "document_start": f"BOS id {BOS_ID}, no EOS",
        },
        "tokenizer": tokenizer_info,
        "shard_tokens": args.shard_tokens,
        "validation_split": rule.describe(),
        "inputs": {"input": args.input, "val": args.val or []},
        "transform": describe_transform(args.transform),
        "splits": {split: split_summary(s) for split, s in stats.items()},
        "notes": "text_bytes is the UTF-8 size of the raw document text; val_bpb divides by the "
        "bytes of the decoded tokens instead (normalized text), see the challenge rules.",
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize documents into challenge-format shards (fineweb_train_*.bin, fineweb_val_*.bin).",
        epilog="Example: python data/build_shards.py --input docs.jsonl.zst --val-fraction 0.05 "
        "--vocab-size 1024 --out data/datasets/mydocs_sp1024",
    )
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="document file (.jsonl, .jsonl.zst, .txt) or folder of them; repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (DATA_PATH for train_gpt.py)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="X.model", help="existing SentencePiece model to encode with")
    tok.add_argument("--vocab-size", type=int, metavar="V",
                     help="train a new SentencePiece BPE tokenizer (byte fallback) with V pieces on the train split")
    val = p.add_mutually_exclusive_group(required=True)
    val.add_argument("--val", action="append", metavar="PATH",
                     help="separate validation documents (file or folder; repeatable)")
    val.add_argument("--val-docs", type=int, metavar="N", help="the first N input documents form the val split")
    val.add_argument("--val-fraction", metavar="F",
                     help="a fraction 0<F<1 of the input documents, evenly spread, forms the val split")
    p.add_argument("--transform", choices=TRANSFORMS, default="none",
                   help="caseops: rewrite capitals as CaseOps operators before encoding (needs a CaseOps "
                   "--tokenizer) and write fineweb_val_bytes_*.bin byte sidecars (default none)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="tokenizer processes (default: all cores, here %(default)s)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field holding the document (default text)")
    p.add_argument("--batch-kb", type=int, default=1024, metavar="KB",
                   help="text per work unit sent to a worker (default 1024)")
    p.add_argument("--tokenizer-train-mb", type=int, default=512, metavar="MB",
                   help="with --vocab-size: train on at most this much training text (default 512)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out folder (after the new one is complete)")
    return p


def split_rule_from_args(args) -> SplitRule:
    if args.val is not None:
        return SplitRule("separate")
    if args.val_docs is not None:
        if args.val_docs < 1:
            raise UsageError(f"--val-docs {args.val_docs}: must be at least 1")
        return SplitRule("first", val_docs=args.val_docs)
    try:
        f = fractions.Fraction(args.val_fraction)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--val-fraction {args.val_fraction}: not a number") from None
    if not 0 < f < 1:
        raise UsageError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    return SplitRule("fraction", fraction=f)


def check_numbers(args) -> None:
    if args.shard_tokens < 1:
        raise UsageError(f"--shard-tokens {args.shard_tokens}: must be positive")
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    if args.batch_kb < 1:
        raise UsageError(f"--batch-kb {args.batch_kb}: must be positive")
    if args.tokenizer_train_mb < 1:  # 0 or below trained on the first document alone
        raise UsageError(f"--tokenizer-train-mb {args.tokenizer_train_mb}: must be positive")
    for flag, given in (("--input", args.input), ("--val", args.val or []), ("--out", [args.out]),
                        ("--tokenizer", [args.tokenizer] if args.tokenizer is not None else [])):
        if any(not path.strip() for path in given):  # Path("") is the current folder
            raise UsageError(f"{flag} '': an empty path")
    if args.vocab_size is not None and not 262 <= args.vocab_size <= 65536:
        raise UsageError(f"--vocab-size {args.vocab_size}: must be between 262 and 65536 (256 byte pieces + specials)")


def check_transform(args, processor) -> None:
    """--transform caseops needs a tokenizer with the operator pieces; such a tokenizer without it gets a note."""
    if args.transform == "caseops" and args.vocab_size is not None:
        raise UsageError("--transform caseops: needs --tokenizer, a model with the CaseOps operator pieces "
                         "(--vocab-size cannot train one)")
    if processor is None:
        return
    try:
        caseops.operator_ids(processor)
    except ValueError as exc:
        if args.transform == "caseops":
            raise UsageError(f"--tokenizer {args.tokenizer}: {exc} (--transform caseops needs one such as "
                             "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model)") from None
        return
    if args.transform == "none":
        print(f"note: --tokenizer {args.tokenizer} is a CaseOps tokenizer, but without --transform caseops "
              "the documents are encoded as they are", file=sys.stderr)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_tokenizer(args, train_files, val_files, rule, tmp: Path):
    """Return (processor, summary info), training and saving a new model if asked."""
    if args.tokenizer:
        processor = load_tokenizer(args.tokenizer)
        info = {"path": args.tokenizer, "sha256": file_sha256(Path(args.tokenizer)), "trained": False}
    else:
        print(f"training a {args.vocab_size}-piece BPE tokenizer on the train split ...", file=sys.stderr, flush=True)
        docs = labelled_documents(train_files, [], rule, args.text_field, lambda n: None)
        processor = train_tokenizer(training_lines(docs, args.tokenizer_train_mb << 20), args.vocab_size)
        check_tokenizer(processor, "trained tokenizer")
        save_tokenizer(processor, tmp)
        if processor.vocab_size() < args.vocab_size:
            print(f"note: the corpus only supports {processor.vocab_size()} pieces, fewer than --vocab-size "
                  f"{args.vocab_size}", file=sys.stderr)
        info = {"path": "tokenizer.model", "sha256": file_sha256(tmp / "tokenizer.model"), "trained": True}
    info["vocab_size"] = processor.vocab_size()
    return processor, info


def build(args) -> dict[str, SplitStats]:
    rule = split_rule_from_args(args)
    check_numbers(args)
    train_files = expand_inputs(args.input, "--input")
    val_files = expand_inputs(args.val, "--val") if args.val else []
    out = Path(args.out)
    check_output(out, args.force)
    # fail on a bad model, or one that does not fit --transform, before creating anything
    check_transform(args, load_tokenizer(args.tokenizer) if args.tokenizer else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result should not be
    try:
        processor, tokenizer_info = prepare_tokenizer(args, train_files, val_files, rule, tmp)
        progress = Progress(sum(p.stat().st_size for p in train_files + val_files))
        writers = {split: ShardWriter(tmp, split, args.shard_tokens) for split in ("train", "val")}
        # the val byte sidecars: written in the same pieces as the val tokens, so their files cut at the same places
        sidecars, original_bytes = ShardWriter(tmp, "val_bytes", args.shard_tokens), 0
        docs = labelled_documents(train_files, val_files, rule, args.text_field, progress.on_read)
        batches = make_batches(docs, args.batch_kb << 10)
        for result in encode_in_order(batches, processor.serialized_model_proto(), args.transform, args.workers):
            for split, tokens in result.tokens.items():
                writers[split].add(tokens, result.documents[split], result.text_bytes[split])
            if result.original_bytes is not None:
                sidecars.add(result.original_bytes, result.documents["val"], 0)
                original_bytes += int(result.original_bytes.sum())
            progress.report(writers)
        progress.report(writers, final=True)
        stats = {split: w.close() for split, w in writers.items()}
        if args.transform == "caseops":
            stats["val"].original_bytes, stats["val"].byte_shards = original_bytes, sidecars.close().shards
        for split, s in stats.items():
            if s.documents == 0:
                raise InputError(f"the {split} split is empty (val = {rule.describe()}); "
                                 "check --val-docs/--val-fraction/--val")
        write_summary(tmp, args, tokenizer_info, rule, stats)
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    try:
        stats = build(args)
    except (UsageError, InputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    for split, s in stats.items():
        print(f"{split}: {s.documents:,} documents, {s.tokens:,} tokens ({s.documents:,} BOS), "
              f"{s.text_bytes:,} text bytes, {len(s.shards)} shard(s)")
        if s.original_bytes is not None:
            print(f"{split} byte sidecars: {s.original_bytes:,} bytes of normalized original text, "
                  f"{len(s.byte_shards)} file(s)")
    print(f"wrote {args.out} in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
