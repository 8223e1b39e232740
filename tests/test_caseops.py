"""CaseOps (data/caseops.py) and `data/build_shards.py --transform caseops` on the real CaseOps tokenizer and real
documents from ../shared/corpus.

What must hold: the transform loses nothing; the builder's tokens are the 2026-04-27 record's, token for token (a
fixture of the record's own output); and every validation document's byte sidecar sums to the bytes val_bpb counts
for untransformed text, the UTF-8 length of the document as SentencePiece normalizes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, ROOT, read_docs

spm = pytest.importorskip("sentencepiece")
sys.path.insert(0, str(ROOT / "data"))
import caseops  # noqa: E402
import train_gpt  # noqa: E402

TOKENIZER = CORPUS / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
FIXTURE = Path(__file__).with_name("caseops_record_fixture.json")
T, A, C, E = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESC

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"CaseOps tokenizer not found: {TOKENIZER}")

ADVERSARIAL = [
    "", "A", "a", "I", "AB", "Ab", "aB", "ABc", "aBC", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "THE END. The End. the end.",
    "McDonald iPhone eBay LaTeX PhD", "A b C d", "X-Ray DON'T O'Neil U.S.A.", "HTML5 CSS3 3D B2B R2D2 x86_64",
    T, A, C, E, T + A + C + E, E + E + E, E + "a", T + "the", "A" + T + "B", "NASA" + A, C + "Title" + T + ".",
    "Äpfel ÄRGER über Straße STRASSE ß ẞ", "Σίσυφος ΣΑΣ ς σ", "İstanbul ıi İI Iı", "ﬁle ﬂow ﬀ ŉ ǰ ΐ",
    "ＡBC ＡＢＣ Ⅻth ™ ℌ \u212aelvin", "E\u0301cole cafe\u0301 A\u030angstro\u0308m", "日本語 😀 \u00a0 \u3000",
    "  leading\n\n\tand   trailing  ", "0123456789", "snake_Case_NAME __INIT__",
]


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    """Random strings over letters of both cases, the operators, non-ASCII letters, digits and whitespace."""
    alphabet = "aAbBzZqQ" + T + A + C + E + "ÄäßİıΣσς0 1_'\n\tﬁＡ\u0301"
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randrange(12))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


def normalized_bytes(sp, text: str) -> int:
    """val_bpb's bytes for a document of untransformed text: its UTF-8 length as SentencePiece normalizes it."""
    return len(sp.normalize(text).replace("▁", " ").encode("utf-8"))


@pytest.fixture(scope="module")
def sidecar_total(sp):
    """The sidecar sum of one document: what data/build_shards.py --transform caseops writes for it."""
    table, op_ids = caseops.piece_byte_table(sp), caseops.operator_ids(sp)
    return lambda text: int(caseops.original_byte_counts(sp.encode(caseops.encode(text)), table, op_ids).sum())


# ---------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, encoded", [
    ("The Paris", T + "the " + T + "paris"),
    ("NASA HTML5", A + "nasa " + A + "html5"),
    ("McDonald iPhone", T + "mc" + C + "donald i" + C + "phone"),
    ("ABc aBC", T + "a" + C + "bc a" + C + "b" + C + "c"),
    ("I a", T + "i a"),
    ("DON'T", A + "don'" + T + "t"),
    ("Straße ÄRGER İs", T + "straße Ä" + A + "rger İs"),  # a word is ASCII letters only
    ("a" + T + "B" + E, "a" + E + T + T + "b" + E + E),
    ("", ""),
])
def test_encode_follows_the_rules(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


@pytest.mark.parametrize("relative", ["gutenberg/val.jsonl.zst", "fineweb_sample/val.jsonl.zst",
                                      "fineweb_sample/train.jsonl.zst"])
def test_round_trip_on_corpus_documents(relative):
    for doc in read_docs(relative):
        encoded = caseops.encode(doc)
        assert not re.search("[A-Z]", encoded)
        assert caseops.decode(encoded) == doc


def test_round_trip_on_adversarial_text():
    for text in ADVERSARIAL + fuzz_strings(3000):
        encoded = caseops.encode(text)
        assert not re.search("[A-Z]", encoded), repr(text)
        assert caseops.decode(encoded) == text, repr(text)


@pytest.mark.parametrize("text", [A + "a", T + T + "a", "a" + T + "b", C + "ab", A + "ab" + C + "c", E, E + "a",
                                  "x" + T, T + "A", T + " a"])
def test_decode_refuses_text_encode_cannot_write(text):
    with pytest.raises(ValueError):
        caseops.decode(text)


# ---------------------------------------------------------------------------------------
# Byte counts
# ---------------------------------------------------------------------------------------


def test_sidecar_totals_are_normalized_bytes_on_adversarial_text(sp, sidecar_total):
    """Whitespace runs count 1, NFKC forms what they become, operators 0, an operator in the text its 3 bytes."""
    for text in ADVERSARIAL + fuzz_strings(1000):
        assert sidecar_total(text) == normalized_bytes(sp, text), repr(text)
    assert sidecar_total(E + T) == 6 and sidecar_total("Hi  there") == 8


def test_the_two_known_exceptions(sp, sidecar_total):
    """NFKC composes a capital with a combining mark differently from its lowercase in two cases: I + U+0307 is
    "İ" (2 bytes) but i + U+0307 stays 3; j + U+030C is "ǰ" (2) but J + U+030C stays 3. The tokens stand for the
    lowercase form, so such a document's sidecar is 1 byte off per occurrence (none in the corpus)."""
    assert sidecar_total("I\u0307") == normalized_bytes(sp, "I\u0307") + 1
    assert sidecar_total("J\u030c") == normalized_bytes(sp, "J\u030c") - 1


# ---------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------


def run_build(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data" / "build_shards.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def read_shard(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any(), path
    assert len(data) == 1024 + 2 * int(header[2]), path
    return np.frombuffer(data[1024:], dtype="<u2")


def read_val(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The val tokens and their sidecars, checking that the files pair up with equal counts."""
    tokens = sorted(out.glob("fineweb_val_[0-9]*.bin"))
    sidecars = sorted(out.glob("fineweb_val_bytes_*.bin"))
    assert [p.name.replace("val_", "val_bytes_") for p in tokens] == [p.name for p in sidecars]
    pairs = [(read_shard(t), read_shard(s)) for t, s in zip(tokens, sidecars)]
    assert all(len(t) == len(s) for t, s in pairs)
    return np.concatenate([t for t, _ in pairs]), np.concatenate([s for _, s in pairs])


def per_document(tokens: np.ndarray, sidecars: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    starts = [*np.flatnonzero(tokens == 1), len(tokens)]
    assert starts[0] == 0 and not sidecars[tokens == 1].any()  # every document opens with a BOS that counts 0
    return [(tokens[a:b], sidecars[a:b]) for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def record():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fixture_build(tmp_path_factory, record) -> Path:
    folder = tmp_path_factory.mktemp("caseops_fixture")
    (folder / "val.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in record["documents"]),
                                      encoding="utf-8")
    (folder / "train.txt").write_text("Some Training Text.", encoding="utf-8")
    out = folder / "out"
    result = run_build("--input", folder / "train.txt", "--val", folder / "val.jsonl", "--tokenizer", TOKENIZER,
                       "--transform", "caseops", "--out", out, "--workers", 2, "--batch-kb", 1, "--shard-tokens", 300)
    assert result.returncode == 0, result.stderr
    return out


def test_tokens_equal_the_records(fixture_build, record):
    assert record["tokenizer_sha256"] == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()
    documents = per_document(*read_val(fixture_build))
    assert len(documents) == len(record["documents"])
    for (ids, _), expected in zip(documents, record["documents"]):
        assert ids.tolist() == expected["ids"], expected["name"]


def test_sidecars_equal_the_records_where_the_rules_agree(fixture_build, record):
    documents = per_document(*read_val(fixture_build))
    agree = [(counts, d) for (_, counts), d in zip(documents, record["documents"]) if d["rules_agree"]]
    assert len(agree) >= 8
    for counts, expected in agree:
        assert counts.tolist() == expected["record_bytes"], expected["name"]


def test_where_the_rules_differ_the_record_counts_raw_text(fixture_build, record, sp):
    """The record's sidecar counts each token's surface, the raw text SentencePiece aligned it with (a whitespace
    run in full, "ﬁ" 3 bytes, all of a character's bytes on its last byte-fallback piece); ours counts the normalized
    piece, as val_bpb counts untransformed text. Operator tokens count the same in both."""
    table, op_ids = caseops.piece_byte_table(sp), caseops.operator_ids(sp)
    documents = per_document(*read_val(fixture_build))
    for (ids, counts), expected in zip(documents, record["documents"]):
        assert int(counts.sum()) == normalized_bytes(sp, expected["text"]), expected["name"]
        for i, token in enumerate(ids.tolist()[1:], start=1):
            if token in op_ids:
                assert counts[i] == expected["record_bytes"][i]
            else:
                assert counts[i] == table[token]
                assert expected["record_bytes"][i] == len(expected["record_surfaces"][i].encode("utf-8"))
    whitespace = next(d for d in record["documents"] if d["name"] == "whitespace runs")
    assert sum(whitespace["record_bytes"]) == len(whitespace["text"].strip().encode()) == 70
    assert normalized_bytes(sp, whitespace["text"]) == len(" ".join(whitespace["text"].split())) == 60


def test_val_sidecars_are_normalized_bytes_per_document(tmp_path, sp):
    """The 15 val books under 250 KB (1.5 MB; whitespace runs in verse and title pages) and the 270 FineWeb pages,
    cut into several files: per document, the sidecar sum is the UTF-8 length of the text as SentencePiece
    normalizes it, and the tokens decode to that text."""
    books = [b for b in read_docs("gutenberg/val.jsonl.zst") if len(b.encode()) < 250_000]
    pages = read_docs("fineweb_sample/train.jsonl.zst")
    (tmp_path / "books.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in books), encoding="utf-8")
    out = tmp_path / "out"
    result = run_build("--input", CORPUS / "fineweb_sample/val.jsonl.zst", "--val", tmp_path / "books.jsonl",
                       "--val", CORPUS / "fineweb_sample/train.jsonl.zst", "--tokenizer", TOKENIZER,
                       "--transform", "caseops", "--out", out, "--workers", 2, "--shard-tokens", 250_000)
    assert result.returncode == 0, result.stderr
    assert "val byte sidecars: " in result.stdout
    tokens, sidecars = read_val(out)
    assert len(books) == 15 and len(list(out.glob("fineweb_val_bytes_*.bin"))) == -(-len(tokens) // 250_000) > 2
    documents = per_document(tokens, sidecars)
    assert len(documents) == len(books) + len(pages)
    op_ids = caseops.operator_ids(sp)
    for (ids, counts), doc in zip(documents, books + pages):
        assert int(counts.sum()) == normalized_bytes(sp, doc)
        assert caseops.decode(sp.decode(ids.tolist()), strict=False) == sp.normalize(doc).replace("▁", " ")
        assert not counts[np.isin(ids, op_ids[:3])].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transform"]["name"] == "lossless_caps_caseops_v1"
    assert summary["splits"]["val"]["original_bytes"] == int(sidecars.sum())
    assert summary["splits"]["val"]["text_bytes"] == sum(len(d.encode()) for d in books + pages)
    assert [s["tokens"] for s in summary["splits"]["val"]["byte_shards"]] == \
        [s["tokens"] for s in summary["splits"]["val"]["shards"]]


def test_default_transform_writes_no_sidecars(tmp_path, sp):
    out = tmp_path / "out"
    result = run_build("--input", CORPUS / "fineweb_sample/val.jsonl.zst", "--val-docs", 5, "--tokenizer", TOKENIZER,
                       "--out", out, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert "is a CaseOps tokenizer, but without --transform caseops" in result.stderr
    assert not list(out.glob("fineweb_val_bytes_*"))
    assert json.loads((out / "summary.json").read_text())["transform"] == {"name": "none"}
    docs = read_docs("fineweb_sample/val.jsonl.zst")[:5]
    assert read_shard(out / "fineweb_val_000000.bin").tolist() == [t for d in docs for t in [1, *sp.encode(d)]]


@pytest.mark.parametrize("tokenizer_args, message", [
    (["--tokenizer", CORPUS / "tokenizers" / "fineweb_1024_bpe.model"], "fineweb_1024_bpe.model: no piece for the "
     "CaseOps operator(s) U+E001, U+E002, U+E003, U+E004: not a CaseOps tokenizer"),
    (["--vocab-size", 1024], "--transform caseops: needs --tokenizer"),
])
def test_caseops_needs_a_caseops_tokenizer(tmp_path, tokenizer_args, message):
    out = tmp_path / "out"
    result = run_build("--input", CORPUS / "fineweb_sample/val.jsonl.zst", "--val-docs", 5, *tokenizer_args,
                       "--transform", "caseops", "--out", out)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# train_gpt.py scores through the sidecars
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory) -> Path:
    """The FineWeb sample through the CaseOps builder: train pages, and the val pages in two shards with sidecars."""
    out = tmp_path_factory.mktemp("caseops_data") / "data"
    result = run_build("--input", CORPUS / "fineweb_sample/train.jsonl.zst", "--val",
                       CORPUS / "fineweb_sample/val.jsonl.zst", "--tokenizer", TOKENIZER, "--transform", "caseops",
                       "--out", out, "--workers", 2, "--shard-tokens", 8_000)
    assert result.returncode == 0, result.stderr
    return out


def tiny_caseops_cfg(data: Path, **extra):
    from conftest import PLAIN_SHAPE

    env = dict(PLAIN_SHAPE, DATA_PATH=str(data), TOKENIZER_PATH=str(TOKENIZER), VOCAB_SIZE="8192", MODEL_DIM="32",
               NUM_HEADS="2", NUM_KV_HEADS="1", NUM_LAYERS="2", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024",
               VAL_BATCH_SIZE="8192", TTT_LR="0", MIX_ETA="0")
    return train_gpt.build_config({**env, **extra})


def test_the_score_divides_by_the_original_texts_bytes(caseops_data, sp):
    """With sidecars beside the val shards, every evaluation counts each scored token's original bytes: the total is
    the val pages' UTF-8 length as SentencePiece normalizes them, not the pieces' (which count each operator 3)."""
    import contextlib

    import torch

    cfg = tiny_caseops_cfg(caseops_data)
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"))
    train_gpt.check_inputs(cfg)
    tokens = train_gpt.load_val_tokens(cfg)
    tables = train_gpt.val_byte_tables(cfg, rt, tokens)
    pages = read_docs("fineweb_sample/val.jsonl.zst")
    assert int(tables.per_token.sum()) == sum(normalized_bytes(sp, page) for page in pages)
    pieces = train_gpt.token_bytes(tables, tokens[:-1].long(), tokens[1:].long()).sum()
    assert pieces > tables.per_token.sum()  # the operators' 3 bytes each
    model = train_gpt.GPT(cfg)
    plan = train_gpt.plan_for(cfg, cfg.repeats)
    for stride in (64, 16):  # round trip and sliding: each target once, each with its token's original bytes
        loss, bpb = train_gpt.evaluate(model, plan, tokens, cfg, 0, 1, tables, contextlib.nullcontext, 64, stride)
        assert abs(loss / math.log(2) * (len(tokens) - 1) / int(tables.per_token[1:].sum()) - bpb) < 1e-9


def test_a_caseops_tokenizer_needs_sidecars_and_sidecars_need_it(caseops_data, tmp_path, tiny_data):
    """One line each: a CaseOps tokenizer over plain shards; sidecars with a plain tokenizer; a missing sidecar; a
    sidecar that disagrees with the pieces."""
    import torch

    from conftest import tokenizer_path

    plain = tmp_path / "plain"
    plain.mkdir()
    for shard in tiny_data.glob("*.bin"):
        (plain / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(train_gpt.DataError, match="a CaseOps tokenizer, but DATA_PATH=.* has no byte sidecars"):
        train_gpt.check_inputs(tiny_caseops_cfg(plain))
    with pytest.raises(train_gpt.DataError, match="has CaseOps byte sidecars, but TOKENIZER_PATH=.* has no CaseOps"):
        cfg = tiny_caseops_cfg(caseops_data)
        train_gpt.check_inputs(dataclasses.replace(cfg, tokenizer_path=str(tokenizer_path(8192))))
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in caseops_data.glob("*.bin"):
        (broken / path.name).write_bytes(path.read_bytes())
    cfg = tiny_caseops_cfg(broken)
    sidecar = sorted(broken.glob("fineweb_val_bytes_*.bin"))[-1]
    data = bytearray(sidecar.read_bytes())
    data[1024 + 2 * 10] += 1  # token 10 of the last file counts one byte more than its piece
    sidecar.write_bytes(bytes(data))
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"))
    with pytest.raises(train_gpt.DataError, match="disagree with TOKENIZER_PATH's pieces at 1 tokens"):
        train_gpt.val_byte_tables(cfg, rt, train_gpt.load_val_tokens(cfg))
    sidecar.unlink()
    with pytest.raises(train_gpt.DataError, match="byte sidecar missing beside"):
        train_gpt.load_val_sidecars(cfg)
    assert [p.name for p in train_gpt.find_shards(str(broken), "val")][0] == "fineweb_val_000000.bin"
