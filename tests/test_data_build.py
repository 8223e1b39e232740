"""data/build_shards.py on real documents and real tokenizers from the shared corpus.

Every build runs the tool as a subprocess (the way users run it) and checks the bytes it
wrote against an independent reading of the format and an independent SentencePiece encode.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")
zstandard = pytest.importorskip("zstandard")

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "data" / "build_shards.py"
CORPUS = REPO.parent / "shared" / "corpus"
SAMPLE_TRAIN = CORPUS / "fineweb_sample" / "train.jsonl.zst"
SAMPLE_VAL = CORPUS / "fineweb_sample" / "val.jsonl.zst"
SP1024 = CORPUS / "tokenizers" / "fineweb_1024_bpe.model"

pytestmark = pytest.mark.skipif(
    not (SAMPLE_TRAIN.is_file() and SAMPLE_VAL.is_file() and SP1024.is_file()),
    reason="shared corpus (../shared/corpus beside the repo) with fineweb_sample and tokenizers is not present",
)


def run_build(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BUILD), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def built(*args) -> None:
    result = run_build(*args)
    assert result.returncode == 0, result.stderr


def read_docs(path: Path) -> list[str]:
    with open(path, "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(line)["text"] for line in text if line.strip()]


def read_shard(path: Path) -> np.ndarray:
    """Independent reader of the challenge shard format; asserts the header and size."""
    data = path.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1, path
    assert not header[3:].any(), f"{path}: header words 3..255 must be zero"
    count = int(header[2])
    assert len(data) == 1024 + 2 * count, f"{path}: size {len(data)} != 1024 + 2*{count}"
    return np.frombuffer(data[1024:], dtype="<u2")


def split_tokens(out: Path, split: str) -> np.ndarray:
    files = sorted(out.glob(f"fineweb_{split}_*.bin"))
    assert files, f"no {split} shards in {out}"
    return np.concatenate([read_shard(f) for f in files])


def expected_tokens(sp, docs: list[str]) -> np.ndarray:
    return np.array([t for doc in docs for t in [1, *sp.encode(doc)]], dtype=np.uint16)


@pytest.fixture(scope="module")
def sp1024():
    return spm.SentencePieceProcessor(model_file=str(SP1024))


@pytest.fixture(scope="module")
def sample_docs():
    return read_docs(SAMPLE_TRAIN)


def test_shards_are_bos_plus_encoded_documents_exactly(tmp_path, sp1024, sample_docs):
    out = tmp_path / "out"
    built("--input", SAMPLE_TRAIN, "--val", SAMPLE_VAL, "--tokenizer", SP1024, "--out", out,
          "--shard-tokens", 50_000, "--workers", 2)
    train = expected_tokens(sp1024, sample_docs)
    val_docs = read_docs(SAMPLE_VAL)
    val = expected_tokens(sp1024, val_docs)
    # token count = sum of encoded lengths + one BOS per document (SOURCES.md: 347,295 + 270)
    assert len(train) == 347_295 + 270
    np.testing.assert_array_equal(split_tokens(out, "train"), train)
    np.testing.assert_array_equal(split_tokens(out, "val"), val)
    shards = sorted(out.glob("fineweb_train_*.bin"))
    assert len(shards) == -(-len(train) // 50_000)
    assert all(len(read_shard(f)) == 50_000 for f in shards[:-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["documents"] == 270
    assert summary["splits"]["train"]["tokens"] == len(train)
    assert summary["splits"]["train"]["text_bytes"] == sum(len(d.encode()) for d in sample_docs)
    assert summary["splits"]["val"]["tokens"] == len(val)
    assert summary["splits"]["val"]["documents"] == len(val_docs)
    assert summary["tokenizer"]["vocab_size"] == 1024
    assert summary["tokenizer"]["sha256"] == hashlib.sha256(SP1024.read_bytes()).hexdigest()  # train_gpt checks it
    for split in ("train", "val"):  # each shard as written: scripts/preflight.py checks them against these
        assert [s["file"] for s in summary["splits"][split]["shards"]] == [
            p.name for p in sorted(out.glob(f"fineweb_{split}_*.bin"))]
        for s in summary["splits"][split]["shards"]:
            data = (out / s["file"]).read_bytes()
            assert (s["bytes"], s["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
            assert s["bytes"] == 1024 + 2 * s["tokens"]


def test_same_bytes_with_one_and_two_workers(tmp_path):
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        built("--input", SAMPLE_TRAIN, "--val-fraction", "0.05", "--tokenizer", SP1024, "--out", out,
              "--shard-tokens", 30_000, "--workers", workers, "--batch-kb", 8)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert list(outputs[0]) == list(outputs[1])
    assert len(outputs[0]) > 10  # many shards, many batches: ordering really was exercised
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], f"{name} differs between 1 and 2 workers"


def test_val_docs_takes_the_first_documents(tmp_path, sp1024, sample_docs):
    out = tmp_path / "out"
    built("--input", SAMPLE_TRAIN, "--val-docs", 10, "--tokenizer", SP1024, "--out", out, "--workers", 2)
    np.testing.assert_array_equal(split_tokens(out, "val"), expected_tokens(sp1024, sample_docs[:10]))
    np.testing.assert_array_equal(split_tokens(out, "train"), expected_tokens(sp1024, sample_docs[10:]))


def test_val_fraction_spreads_documents_evenly(tmp_path, sp1024, sample_docs):
    out = tmp_path / "out"
    built("--input", SAMPLE_TRAIN, "--val-fraction", "0.1", "--tokenizer", SP1024, "--out", out, "--workers", 2)
    val_index = [i for i in range(len(sample_docs)) if (i + 1) // 10 > i // 10]
    assert len(val_index) == 27 and val_index[:2] == [9, 19]
    val = [sample_docs[i] for i in val_index]
    train = [d for i, d in enumerate(sample_docs) if i not in set(val_index)]
    np.testing.assert_array_equal(split_tokens(out, "val"), expected_tokens(sp1024, val))
    np.testing.assert_array_equal(split_tokens(out, "train"), expected_tokens(sp1024, train))
    assert json.loads((out / "summary.json").read_text())["splits"]["val"]["documents"] == 27


def test_text_files_and_folders_in_sorted_order(tmp_path, sp1024):
    docs = tmp_path / "docs"
    (docs / "b").mkdir(parents=True)
    (docs / "a.txt").write_text("First book.\nIt has two lines.\n", encoding="utf-8")
    (docs / "b" / "c.jsonl").write_text(json.dumps({"text": "Second, from JSONL."}) + "\n\n", encoding="utf-8")
    (docs / "b" / "notes.md").write_text("not a document", encoding="utf-8")
    (docs / "z.txt").write_text("Third one.", encoding="utf-8")
    out = tmp_path / "out"
    built("--input", docs, "--val-docs", 1, "--tokenizer", SP1024, "--out", out, "--workers", 1)
    first = "First book.\nIt has two lines.\n"
    np.testing.assert_array_equal(split_tokens(out, "val"), expected_tokens(sp1024, [first]))
    np.testing.assert_array_equal(
        split_tokens(out, "train"), expected_tokens(sp1024, ["Second, from JSONL.", "Third one."])
    )


def test_new_tokenizer_has_byte_fallback_and_standalone_space(tmp_path, sample_docs):
    docs = tmp_path / "docs"
    docs.mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in sample_docs[:120])
    (docs / "web.jsonl").write_text(lines, encoding="utf-8")
    rare = "Snow ☃ and 日本語 and naïve café text."
    (docs / "z_rare.txt").write_text(rare, encoding="utf-8")
    out = tmp_path / "out"
    built("--input", docs, "--val-docs", 5, "--vocab-size", 400, "--out", out, "--workers", 2)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.vocab_size() == 400
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    assert sp.piece_to_id("▁") != sp.unk_id(), "a standalone '▁' piece keeps bpb byte counting exact"
    assert sp.decode(sp.encode(rare)) == rare  # unseen characters survive through byte pieces
    train = split_tokens(out, "train")
    assert not np.any(train == sp.unk_id())
    np.testing.assert_array_equal(train, expected_tokens(sp, sample_docs[5:120] + [rare]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer"]["trained"] and summary["tokenizer"]["vocab_size"] == 400
    again = tmp_path / "again"
    built("--input", docs, "--val-docs", 5, "--vocab-size", 400, "--out", again, "--workers", 1)
    for path in out.iterdir():  # training, too, gives the same bytes whatever the worker count
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "fine"}', '{"text": "also fine"}', '{"text": broken'], ":3: invalid JSON"),
        (['{"text": "fine"}', '{"body": "no text here"}'], ":2: no 'text' field"),
        (['{"text": 17}'], ":1: field 'text' is int"),
    ],
)
def test_bad_document_line_names_file_and_line(tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_build("--input", bad, "--val-docs", 1, "--tokenizer", SP1024, "--out", out, "--workers", 1)
    assert result.returncode == 1
    assert f"{bad}{message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not no_leftovers(tmp_path)


def test_missing_input_is_a_usage_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = run_build("--input", missing, "--val-docs", 1, "--tokenizer", SP1024, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"--input {missing}: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_existing_output_is_kept_unless_force(tmp_path, sp1024):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--input", SAMPLE_VAL, "--val-docs", 2, "--tokenizer", SP1024, "--out", out, "--workers", 1]
    result = run_build(*args)
    assert result.returncode == 2 and "--force" in result.stderr and str(out) in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    built(*args, "--force")
    assert not (out / "keep.txt").exists()
    assert (out / "fineweb_val_000000.bin").is_file() and not no_leftovers(tmp_path)


def test_empty_train_split_fails_without_output(tmp_path):
    out = tmp_path / "out"
    result = run_build("--input", SAMPLE_VAL, "--val-docs", 1000, "--tokenizer", SP1024, "--out", out)
    assert result.returncode == 1 and "train split is empty" in result.stderr
    assert not out.exists() and not no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--tokenizer", ""), "--tokenizer '': an empty path"),  # trained a "None-piece" tokenizer: ValueError
        (("--input", ""), "--input '': an empty path"),  # read every document under the current folder
        (("--out", ""), "--out '': an empty path"),
        (("--vocab-size", 300, "--tokenizer-train-mb", 0), "--tokenizer-train-mb 0: must be positive"),  # 1 document
        (("--vocab-size", 300, "--tokenizer-train-mb", -1), "--tokenizer-train-mb -1: must be positive"),
    ],
)
def test_arguments_that_cannot_mean_anything_are_usage_errors(tmp_path, args, message):
    given = dict(zip(args[::2], args[1::2]))
    rest = {"--input": SAMPLE_TRAIN, "--out": tmp_path / "out", "--workers": 1}
    rest.update({"--tokenizer": SP1024} if "--vocab-size" not in given else {})
    rest.update({"--val-docs": 2} if "--val" not in given else {})
    command = [*args, *(x for item in rest.items() if item[0] not in given for x in item)]
    result = subprocess.run([sys.executable, str(BUILD), *map(str, command)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)  # '' is this folder
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"build_shards.py: error: {message}\n", result.stderr
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)
