"""Shared fixtures: real tokenizers and documents from ../shared/corpus, real shards in a temp dir,
and a runner that launches train_gpt.py as users do (plain python or torchrun), with a timeout."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches real runs in subprocesses (skip with -m 'not slow')")
    # One intra-op thread in this process, as clean_environ gives the runs it launches: the tensors here are tiny, and
    # two OpenMP threads on two cores that anything else also uses (a launched run, another job) spin against it:
    # tests/test_lora.py took 100 s with two threads on a loaded 2-core machine, 17 s with one.
    import torch

    torch.set_num_threads(1)


def tokenizer_path(vocab: int) -> Path:
    path = CORPUS / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not path.is_file():
        pytest.skip(f"real tokenizer not found: {path.name} (needs ../shared/corpus beside the repo)")
    return path


def read_docs(relative: str) -> list[str]:
    import zstandard

    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(f"corpus file not found: {relative}")
    with open(path, "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8").read()
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


def write_shard(path: Path, tokens) -> None:
    header = np.zeros(train_gpt.HEADER_INTS, dtype="<i4")
    header[:3] = (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def encode_docs(sp, docs: list[str]) -> list[int]:
    tokens = []
    for ids in sp.encode(docs):
        tokens += [1] + ids
    return tokens


@pytest.fixture(scope="session")
def sp1024():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path(1024)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, sp1024) -> Path:
    """The real FineWeb sample (270 train / 15 val documents) as challenge shards, sp1024."""
    folder = tmp_path_factory.mktemp("fineweb_sp1024")
    train = encode_docs(sp1024, read_docs("fineweb_sample/train.jsonl.zst"))
    write_shard(folder / "fineweb_train_000000.bin", train[: len(train) // 2])
    write_shard(folder / "fineweb_train_000001.bin", train[len(train) // 2:])
    write_shard(folder / "fineweb_val_000000.bin", encode_docs(sp1024, read_docs("fineweb_sample/val.jsonl.zst")))
    return folder


@pytest.fixture(scope="session")
def small_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with its validation cut to 3,000 tokens (5 documents): for runs whose point is not the score of the
    whole sample, since every run evaluates its validation split several times (budget estimate, round trip, sliding
    window). The training shards are tiny_data's."""
    folder = tmp_path_factory.mktemp("small")
    for shard in tiny_data.glob("fineweb_train_*.bin"):
        (folder / shard.name).write_bytes(shard.read_bytes())
    write_shard(folder / "fineweb_val_000000.bin", train_gpt.map_shard(tiny_data / "fineweb_val_000000.bin")[:3000])
    return folder


@pytest.fixture(scope="session")
def single_run(small_data, tmp_path_factory) -> tuple[Path, str]:
    """One tiny run of tiny_env's settings (30 steps of 8 micro-steps) on small_data: (its folder, its stdout).
    runs/single/ there holds its log, artifact, float checkpoint and shipped code, which tests read and rescore
    (test_end_to_end, test_shipped_code) but never change."""
    cwd = tmp_path_factory.mktemp("single")
    result = run_script(tiny_env(small_data, RUN_ID="single", MICRO_BATCH_TOKENS=256), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result.stdout


# The default is the frontier shape (11 blocks, core 3..5 looped, partial RoPE over 16 dims); tiny test
# models set these so NUM_LAYERS alone gives a plain, unshared stack with full RoPE.
PLAIN_SHAPE = {"NUM_UNIQUE_LAYERS": "0", "LOOP_START": "0", "LOOP_END": "-1", "PROG_DEPTH": "", "ROPE_DIMS": "0",
               "SMEAR_GATE": "0"}


def trained_like(cfg, seed: int = 0):
    """A GPT with random weights everywhere: zero-init projections, gates and lambdas would hide what a test looks
    for (mixing across positions or lanes, learned shares)."""
    import torch

    torch.manual_seed(seed)
    model = train_gpt.GPT(cfg)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def tiny_env(data: Path, **overrides) -> dict[str, str]:
    env = dict(PLAIN_SHAPE, DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer_path(1024)), VOCAB_SIZE="1024",
               MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", NUM_LAYERS="2", TRAIN_SEQ_LEN="64",
               TRAIN_BATCH_TOKENS="2048", ITERATIONS="30", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="1",
               VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="5", VAL_BATCH_SIZE="16384", EVAL_STRIDE="16",
               # the plain export and evaluation (int8, last weights, no TTT, no mixer); test_end_to_end runs the
               # default ones too
               QUANT_BITS_ATTN="8", QUANT_BITS_MLP="8", GPTQ="0", EMA_HORIZON="0", EXPORT_WEIGHTS="last", TTT_LR="0",
               MIX_ETA="0")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def clean_environ() -> dict[str, str]:
    """The test process's environment minus anything that would be read as (or near) a knob."""
    env = {k: v for k, v in os.environ.items() if k not in train_gpt.env_knobs()}
    try:
        train_gpt.check_names(env)
    except train_gpt.ConfigError:
        env = {k: v for k, v in env.items() if k in ("PATH", "HOME", "LANG") or k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_script(env: dict[str, str], cwd: Path, nproc: int = 0, timeout: int = 240,
               script: Path | None = None) -> subprocess.CompletedProcess:
    """Run train_gpt.py (or `script`) with `env` added; nproc > 0 launches it under torchrun."""
    script = script or ROOT / "train_gpt.py"
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    return subprocess.run(cmd, cwd=cwd, env={**clean_environ(), **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def main_with(monkeypatch, capsys):
    """train_gpt.main() in this process, with `env` on top of a clean environment and `cwd` as its folder:
    (exit code, stderr lines). Its signal watch is taken down afterwards. Cheaper than run_script by a launch (torch's
    import) where the shell adds nothing to what a test checks."""
    import signal

    def call(env: dict, cwd: Path) -> tuple[int, list[str]]:
        monkeypatch.setattr(os, "environ", {**clean_environ(), **{k: str(v) for k, v in env.items()}})
        monkeypatch.chdir(cwd)
        try:
            code = train_gpt.main()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(signal.set_wakeup_fd(-1))
        return code, capsys.readouterr().err.splitlines()
    return call


def final_summary(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("final_summary ")]
    assert len(lines) == 1, output[-3000:]
    return json.loads(lines[0].removeprefix("final_summary "))


def logged_losses(output: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step:(\d+)/\d+ train_loss:([\d.]+)", output, re.M)}
