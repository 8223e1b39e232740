"""Eight ranks on the CPU (torchrun, gloo), as the competition launches the run, with the default pipeline's features at
the tiniest shape: progressive depth over a looped core, parallel residuals and lanes after it, the smear gate,
partial RoPE, EMA, GPTQ export, reload, round trip, sliding window, SGD TTT with the n-gram mixer; then LoRA TTT with a
global phase, and a SIGTERM with RESUME.

What must match a one-rank run exactly, and what only to rounding:
- Which tokens are scored, and their bytes: integers, summed over ranks. val_loss / val_bpb (= bytes * ln 2 / tokens)
  is the same number on any number of ranks (asserted to 1e-12): every token is scored once however the windows or
  the documents are shared out, ranks without any included. So is the step the depth switches on (step / ITERATIONS).
- Scoring one artifact: each target's loss is a float32 of its own batch row, and the ranks' float64 sums of a few
  thousand such values are exact, in any order. But the number of ranks sets the batch's rows, and the CPU's matrix
  kernels round a row differently for another batch shape: 1e-10 apart, bit-equal at some shapes (asserted to 1e-8).
- Whatever sums gradients or statistics over ranks (training, SGD TTT, LoRA TTT's global phase, the mixer's weight
  step) adds float32 values in another order: rounding (scores of one artifact asserted to 1e-6), which steps of Muon
  grow, so a training run's scores on another number of ranks are compared in test_end_to_end (two ranks), loosely.
- The same number of ranks twice: bit for bit (gloo reduces in a fixed order), a run resumed after a SIGTERM included.
Slow: 2.5 minutes on a 2-core VM that other jobs shared, ~225 s of CPU time (four eight-rank launches of ~55 s of
CPU each, two one-rank evaluations)."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import PLAIN_SHAPE, final_summary, logged_losses, run_script, tiny_env, write_shard
from test_signals import final_scores, interrupted_segment, worker_traceback
from train_gpt import build_config, document_bounds, map_shard

# one worker for the module under `pytest -n 2 --dist loadgroup`: its fixtures (an eight-rank run) are built once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ranks")]

RANKS = 8
ARTIFACT = "runs/whole/final_model.mixedgptq_brotli.ptz"
# The default model's structure at its smallest: 3 blocks, the middle one the looped core (3 passes at full depth, as
# the default's core; PROG_DEPTH, ROPE_DIMS and SMEAR_GATE stay at their defaults), parallel residuals and lanes on the
# block after the core; width 72 makes the tied embedding (1024 x 72) large enough to be quantized, with GPTQ.
SHAPE = dict(NUM_UNIQUE_LAYERS=3, NUM_LAYERS=5, LOOP_START=1, LOOP_END=1, PARALLEL_RESIDUAL_START=2,
             PARALLEL_LANES_START=2, MODEL_DIM=72, NUM_HEADS=2, NUM_KV_HEADS=1)
# 4 sequences a rank and one micro-step on 8 ranks, 8 micro-steps on one: the same global batch.
RUN = dict(ITERATIONS=10, TRAIN_LOG_EVERY=1, MICRO_BATCH_TOKENS=256, GPTQ_BATCHES=8, TTT_CHUNK=1024, MIX_BUCKETS=4096)
# LoRA TTT with a global phase after the first 2 documents, 2 rows a batch on 8 ranks (16 on one): the split has 5
# documents, so three ranks score none and still join every collective.
LORA = dict(TTT_ADAPTER="lora", MIX_ETA="0", TTT_LR="0.05", TTT_LORA_RANK="4", TTT_LORA_LR="0.01", TTT_PHASES="2",
            VAL_BATCH_SIZE="1024", EVAL_STRIDE="0")


@pytest.fixture(scope="module")
def data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with its validation cut to 3,000 tokens (5 documents): each launch evaluates it several times."""
    folder = tmp_path_factory.mktemp("ranks_data")
    for shard in tiny_data.glob("fineweb_train_*.bin"):
        (folder / shard.name).write_bytes(shard.read_bytes())
    write_shard(folder / "fineweb_val_000000.bin", map_shard(tiny_data / "fineweb_val_000000.bin")[:3000])
    return folder


@pytest.fixture(scope="module")
def env(data) -> dict[str, str]:
    """tiny_env without its plain shape and plain export: the defaults' features, export and evaluation."""
    d = build_config({})
    pipeline = dict(QUANT_BITS_ATTN=d.quant_bits_attn, QUANT_BITS_MLP=d.quant_bits_mlp, GPTQ=int(d.gptq),
                    EMA_HORIZON=d.ema_horizon, EXPORT_WEIGHTS=d.export_weights, TTT_LR=d.ttt_lr, MIX_ETA=d.mix_eta)
    base = {k: v for k, v in tiny_env(data, **pipeline, **RUN).items() if k not in PLAIN_SHAPE}
    return {**base, **{k: str(v) for k, v in SHAPE.items()}}


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def whole(env, cwd) -> str:
    """The eight-rank run: train, export, reload, score."""
    result = run_script({**env, "RUN_ID": "whole"}, cwd, nproc=RANKS, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def one_rank_eval_only(env: dict, cwd: Path, run_id: str, **overrides) -> str:
    result = run_script({**env, "RUN_ID": run_id, "EVAL_ONLY": str(cwd / ARTIFACT), **overrides}, cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def evals(output: str) -> dict[str, tuple[float, float]]:
    return {k: (v["val_loss"], v["val_bpb"]) for k, v in final_summary(output)["evals"].items()}


def assert_same_tokens_scored(a: tuple[float, float], b: tuple[float, float]) -> None:
    """val_loss / val_bpb = bytes * ln 2 / tokens: equal when the same tokens and bytes were scored."""
    assert abs(a[0] / a[1] - b[0] / b[1]) < 1e-12, (a, b)


def test_eight_ranks_run_the_default_pipeline_in_step(whole):
    assert whole.count("final_summary ") == 1  # rank 0 logs alone
    assert re.search(r"^model_params:\d+ unique_blocks:3 plan:\[0, 1, 1, 1, 2\] repeats:3 world_size:8 micro_steps:1 ",
                     whole, re.M)
    switches = re.findall(r"^depth_switch step:(\d+) t:[\d.]+ passes:(\d)->(\d) ranks_agree:(\w+)$", whole, re.M)
    assert switches == [("5", "1", "3", "True")]  # PROG_DEPTH's 0.35: t = 4/10 at step 5
    assert re.search(r"^rank_param_checksum:\S+ ranks_identical:True full_depth_from_step:5$", whole, re.M)
    assert "gptq_calibration hessians:13 batches:8 tokens:2048 " in whole  # GPTQ_BATCHES shared out, 1 a rank
    assert re.search(r"^export_try:1 attn:int6/k12.85/gptq mlp:int6/k12.85/gptq embed:int8/k20/gptq .* fits ", whole,
                     re.M)
    summary = final_summary(whole)
    assert summary["world_size"] == RANKS and summary["steps"] == 10
    kinds = ("roundtrip", "sliding", "ttt_mix")
    assert list(summary["evals"]) == [f"final_mixedgptq_brotli_{k}" for k in kinds]
    sliding = summary["evals"]["final_mixedgptq_brotli_sliding"]["val_bpb"]
    assert summary["val_bpb"] < sliding - 0.05  # TTT and the mixer moved the score


def test_eight_ranks_score_an_artifact_as_one_rank(whole, env, cwd):
    """The eight-rank run's own scores of its artifact against one rank's scores of the same file."""
    eight, one = evals(whole), evals(one_rank_eval_only(env, cwd, "one"))
    assert list(one) == list(eight)
    for name in eight:
        assert_same_tokens_scored(eight[name], one[name])
        tolerance = 1e-6 if name.endswith("_mix") else 1e-8  # SGD TTT and the mixer sum over ranks
        assert abs(eight[name][1] - one[name][1]) < tolerance, (name, eight[name], one[name])


def test_lora_ttt_with_a_phase_on_eight_ranks_scores_as_one(whole, env, cwd, data):
    assert len(document_bounds(torch.from_numpy(map_shard(data / "fineweb_val_000000.bin").astype("int64")))) == 5
    result = run_script({**env, **LORA, "RUN_ID": "lora8", "EVAL_ONLY": str(cwd / ARTIFACT)}, cwd, nproc=RANKS,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    eight, one = evals(result.stdout), evals(one_rank_eval_only(env, cwd, "lora1", **LORA))
    assert list(eight) == list(one) == ["final_mixedgptq_brotli_roundtrip", "final_mixedgptq_brotli_ttt_lora"]
    for name, tolerance in zip(eight, (1e-8, 1e-6)):  # the phase sums gradients over ranks; the adapters do not
        assert_same_tokens_scored(eight[name], one[name])
        assert abs(eight[name][1] - one[name][1]) < tolerance, (name, eight[name], one[name])
    roundtrip, lora = eight.values()
    assert lora[1] < roundtrip[1] - 0.05  # the adapters and the phase learned


def test_sigterm_to_every_process_and_resume_on_eight_ranks_end_as_the_whole_run(whole, env, cwd):
    """A scheduler's SIGTERM to torchrun and all eight workers (each gets two): one line, a checkpoint of every rank,
    and RESUME ends with the whole run's weights and scores, bit for bit."""
    code, out, err = interrupted_segment({**env, "RUN_ID": "cut"}, cwd, RANKS, "job", signal.SIGTERM, at_step=3)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not worker_traceback(err) and code == 1, err[-3000:]
    stopped = re.fullmatch(r"error: SIGTERM received: training stopped after step (\d+), wrote a checkpoint, exported "
                           r"nothing; continue with RESUME=runs/cut", errors[0])
    assert stopped and 3 <= int(stopped[1]) < 10, errors
    run = cwd / "runs" / "cut"
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == \
        ["checkpoint.json"] + [f"step{stopped[1]}.rank{r}.pt" for r in range(RANKS)]
    resumed = run_script({**env, "RUN_ID": "cut", "RESUME": str(run)}, cwd, nproc=RANKS, timeout=300)
    assert resumed.returncode == 0 and f"resume step:{stopped[1]} " in resumed.stdout, resumed.stderr[-3000:]
    assert re.search(r"^rank_param_checksum:\S+ ranks_identical:True ", resumed.stdout, re.M)
    ends = [torch.load(cwd / "runs" / name / "final_model.float.pt") for name in ("whole", "cut")]
    for kind in ("last", "ema"):
        assert all(torch.equal(ends[0][kind][k], ends[1][kind][k]) for k in ends[0][kind]), kind
    assert final_scores(resumed.stdout) == final_scores(whole) and len(final_scores(whole)) == 3
    losses = logged_losses(whole)
    assert all(logged_losses(resumed.stdout)[s] == losses[s] for s in range(int(stopped[1]) + 1, 11))
