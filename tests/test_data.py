"""Shard reading, rank-disjoint loading, and one-line errors for bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_env, tokenizer_path, write_shard
from train_gpt import DataError, ShuffledLoader, map_shard, read_shard_header


def position_shards(folder, sizes):
    """Shards whose tokens are their global positions (mod 65536), so a batch tells where it came from."""
    paths, pos = [], 0
    for i, n in enumerate(sizes):
        path = folder / f"fineweb_train_{i:06d}.bin"
        write_shard(path, (np.arange(pos, pos + n) % 65536))
        paths.append(path)
        pos += n
    return paths


def test_shard_round_trip(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, [1, 2, 65535, 0])
    assert read_shard_header(path) == 4 and path.stat().st_size == 1024 + 8
    assert map_shard(path).tolist() == [1, 2, 65535, 0]


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), "does not match its header"),
    (lambda p: p.write_bytes(b"\0" * 4 + p.read_bytes()[4:]), "not a token shard"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated header"),
])
def test_bad_shards_name_the_file(tmp_path, corrupt, message):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, list(range(100)))
    corrupt(path)
    with pytest.raises(DataError, match=message) as err:
        read_shard_header(path)
    assert str(path) in str(err.value)


def copy_data(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def bad_input_cases(tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = copy_data(tiny_data, tmp_path / "truncated")
    shard = truncated / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    magic = copy_data(tiny_data, tmp_path / "magic")
    shard_m = magic / "fineweb_val_000000.bin"
    shard_m.write_bytes(b"\x01\x02\x03\x04" + shard_m.read_bytes()[4:])
    short = copy_data(tiny_data, tmp_path / "short")
    write_shard(short / "fineweb_val_000000.bin", list(range(64)))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    return [
        (dict(DATA_PATH=str(tmp_path / "missing")), "DATA_PATH"),
        (dict(DATA_PATH=str(empty)), "no fineweb_train_"),
        (dict(DATA_PATH=str(truncated)), "fineweb_train_000001.bin"),
        (dict(DATA_PATH=str(magic)), "fineweb_val_000000.bin: not a token shard"),
        (dict(TOKENIZER_PATH=str(tmp_path / "nope.model")), "TOKENIZER_PATH"),
        (dict(VOCAB_SIZE="8192", TOKENIZER_PATH=str(tokenizer_path(1024))), "VOCAB_SIZE=8192"),
        (dict(DATA_PATH=str(short)), "shorter than one sequence"),
        (dict(OUT_DIR=str(taken)), "already exists"),
    ]


def test_bad_inputs_give_one_line_and_exit_2(tiny_data, tmp_path, main_with):
    """main() as the script runs it, in this process (test_faults launches a few such runs as users do)."""
    for overrides, culprit in bad_input_cases(tiny_data, tmp_path):
        code, lines = main_with(tiny_env(tiny_data, **overrides), tmp_path)
        assert code == 2, (overrides, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], (overrides, lines)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    assert list((tmp_path / "taken").iterdir()) == [tmp_path / "taken" / "keep.txt"]


def shuffled_loaders(paths, world_size, seqs=2, seq_len=16, seed=7):
    return [ShuffledLoader(paths, r, world_size, seqs, seq_len, torch.device("cpu"), seed)
            for r in range(world_size)]


def window_starts(x):
    """Shards of position_shards hold their positions: a window's first input token is its start."""
    return x[:, 0].tolist()


@pytest.mark.parametrize("sizes, world_size", [([700, 333, 1500], 1), ([700, 333, 1500], 3), ([4000], 8)])
def test_shuffled_loader_draws_each_window_once_per_epoch_ranks_disjoint(tmp_path, sizes, world_size):
    paths = position_shards(tmp_path, sizes)
    loaders = shuffled_loaders(paths, world_size)
    per_epoch = len(loaders[0].order)
    steps = per_epoch // (world_size * 2)
    seen = []
    for _ in range(steps):
        step = []
        for loader in loaders:
            x, y = loader.next_batch()
            assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(y - x == 1)  # inputs, targets one later
            step += window_starts(x)
        assert len(set(step)) == len(step)  # ranks disjoint within a step
        seen += step
    assert len(set(seen)) == len(seen) == steps * world_size * 2  # no window twice in an epoch
    # windows never overlap and never cross a shard's end: sorted starts are >= seq_len apart within a shard
    bounds = np.cumsum([0] + sizes)
    for lo, hi in zip(bounds, bounds[1:]):
        mine = sorted(s for s in seen if lo <= s < hi)
        assert all(b - a >= 16 for a, b in zip(mine, mine[1:])) and all(s + 17 <= hi for s in mine)


def test_shuffled_loader_resumes_exactly_and_seeds_differ(tmp_path):
    """RESUME passes over the batches already trained on (skip): a fresh loader then reads on as the first
    one does, whatever that one had prefetched, across epochs."""
    paths = position_shards(tmp_path, [500, 900])
    first = shuffled_loaders(paths, 2)
    batches = []
    for _ in range(40):  # more than an epoch
        batches.append([window_starts(loader.next_batch()[0]) for loader in first])
        for loader in first:
            loader.prefetch()  # as train_step does
    assert first[0].epoch >= 1
    resumed = shuffled_loaders(paths, 2)
    for loader in resumed:
        loader.skip(25)
    assert [[window_starts(ld.next_batch()[0]) for ld in resumed] for _ in range(15)] == batches[25:]
    assert sorted(first[0].order.tolist()) == list(range(len(first[0].order)))
    other_seed = shuffled_loaders(paths, 2, seed=8)
    assert [window_starts(ld.next_batch()[0]) for ld in other_seed] != batches[0]


def test_shuffled_loader_refuses_shards_shorter_than_a_window(tmp_path):
    paths = position_shards(tmp_path, [10, 12])
    with pytest.raises(DataError, match="TRAIN_SEQ_LEN"):
        shuffled_loaders(paths, 1)
