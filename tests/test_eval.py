"""val_bpb exactness on real documents and tokenizers; windows score every target exactly once."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import encode_docs, read_docs, tokenizer_path
from train_gpt import ByteTables, byte_tables, plan_windows, score_windows, shard_range, token_bytes


def load_sp(vocab):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path(vocab)))


def counted_bytes_per_doc(sp, tables: ByteTables, docs: list[str]) -> list[int]:
    """Bytes counted by the scorer's rule, per document, over a stream with BOS before each doc."""
    stream = torch.tensor(encode_docs(sp, docs))
    per_token = token_bytes(tables, stream[:-1], stream[1:])
    counts = [0]  # the stream opens with the first document's BOS
    for target, n in zip(stream[1:].tolist(), per_token.tolist()):
        if target == 1:
            counts.append(0)
        else:
            counts[-1] += n
    return counts


def decoded_bytes(sp, ids: list[int]) -> int:
    """UTF-8 length of the decoded tokens; each <unk> splits the text (it counts 0 bytes, and the
    token after it, like the first token of a document, gets no leading space)."""
    total, run = 0, []
    for i in ids + [sp.unk_id()]:
        if i == sp.unk_id():
            total += len(sp.decode(run).encode("utf-8")) if run else 0
            run = []
        else:
            run.append(i)
    return total


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_bytes_equal_decoded_utf8_length_per_document(vocab):
    sp = load_sp(vocab)
    tables = byte_tables(sp, vocab)
    docs = read_docs("fineweb_sample/val.jsonl.zst") + read_docs("fineweb_sample/train.jsonl.zst")[:40]
    counts = counted_bytes_per_doc(sp, tables, docs)
    assert len(counts) == len(docs)
    for doc, counted in zip(docs, counts):
        ids = sp.encode(doc)
        if sp.unk_id() not in ids:
            assert counted == len(sp.decode(ids).encode("utf-8"))
        assert counted == decoded_bytes(sp, ids)


def test_unknown_characters_count_zero_bytes():
    sp = load_sp(1024)
    tables = byte_tables(sp, 1024)
    doc = "Hello 世界 wörld. été  spaces\n\nnew line ✓"
    ids = sp.encode(doc)
    assert ids.count(sp.unk_id()) >= 3
    [counted] = counted_bytes_per_doc(sp, tables, [doc])
    assert counted == decoded_bytes(sp, ids)
    # pieces: Hello ▁ <unk> ▁w <unk> rld. ▁ <unk> t <unk> ▁spaces ▁new ▁line ▁ <unk>; a space right
    # after <unk> is not counted, so the counted text is "Hello " "w" "rld. " "t" "spaces new line "
    assert counted == len("Hello ") + len("w") + len("rld. ") + len("t") + len("spaces new line ")
    assert tables.base_bytes[sp.unk_id()] == 0 and tables.boundary[sp.unk_id()]


def test_byte_fallback_pieces_count_one_byte():
    sp = load_sp(8192)
    tables = byte_tables(sp, 8192)
    byte_ids = [i for i in range(8192) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(tables.base_bytes[i] == 1 for i in byte_ids)
    [counted] = counted_bytes_per_doc(sp, tables, ["日本語 ✓ text"])
    assert counted == len("日本語 ✓ text".encode("utf-8"))


@pytest.mark.parametrize("num_targets, window, stride", [
    (1000, 100, 100), (1037, 100, 100), (1037, 128, 64), (129, 128, 64), (128, 128, 16), (5000, 256, 7)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_windows_score_every_target_exactly_once_across_ranks(num_targets, window, stride, world_size):
    starts, score_from = plan_windows(num_targets, window, stride)
    coverage = torch.zeros(num_targets, dtype=torch.long)
    for rank in range(world_size):
        lo, hi = shard_range(len(starts), rank, world_size)
        for s, f in zip(starts[lo:hi].tolist(), score_from[lo:hi].tolist()):
            coverage[s + f:s + window] += 1
    assert torch.equal(coverage, torch.ones_like(coverage))
    assert score_from[0] == 0  # the first window scores all its tokens
    assert (starts >= 0).all() and (starts + window <= num_targets).all()


def test_scorer_matches_a_direct_computation():
    torch.manual_seed(0)
    vocab, window = 64, 16
    tokens = torch.randint(0, vocab, (203,), dtype=torch.int32)
    tables = ByteTables(torch.randint(0, 4, (vocab,), dtype=torch.int16), torch.rand(vocab) < 0.5, torch.rand(vocab) < 0.2)
    table = torch.randn(vocab, vocab)

    def logits_fn(x):  # a causal "model": logits depend on the current token only
        return table[x]

    starts, score_from = plan_windows(len(tokens) - 1, window, 5)
    loss, count, nbytes = score_windows(logits_fn, tokens, starts, score_from, window, 3, tables).tolist()
    x, y = tokens[:-1].long(), tokens[1:].long()
    direct = torch.nn.functional.cross_entropy(table[x], y, reduction="sum").item()
    assert count == len(y)
    assert math.isclose(loss, direct, rel_tol=1e-6)
    assert nbytes == token_bytes(tables, x, y).sum().item()


def test_padded_last_batch_scores_the_same_and_keeps_one_shape():
    torch.manual_seed(5)
    tokens = torch.randint(0, 50, (400,), dtype=torch.int32)
    tables = ByteTables(torch.ones(50, dtype=torch.int16), torch.zeros(50, dtype=torch.bool), torch.ones(50, dtype=torch.bool))
    weight = torch.randn(50, 50)
    shapes = []

    def logits_fn(x):
        shapes.append(tuple(x.shape))
        return weight[x]  # a bigram model: enough to give every target its own loss

    starts, score_from = plan_windows(399, 32, 8)
    whole = score_windows(logits_fn, tokens, starts, score_from, 32, len(starts), tables)
    shapes.clear()
    padded = score_windows(logits_fn, tokens, starts, score_from, 32, 7, tables)
    assert len(starts) % 7 and set(shapes) == {(7, 32)}  # the last, partial batch was padded
    assert torch.allclose(whole, padded, rtol=1e-12) and whole[1] == 399
