"""Whole runs on the CPU, launched as users launch them: plain python and 2-process torchrun (gloo)."""
from __future__ import annotations

import re

import pytest

from conftest import PLAIN_SHAPE, ROOT, final_summary, logged_losses, run_script, tiny_env
from train_gpt import PACKED_HEADER, code_only, unpack_artifact, unpack_code, weight_group


def stored_matrices(artifact) -> dict[str, str]:
    """What an artifact holds per weight group: '<count>x<int bits or float dtype>' of its weight matrices."""
    counts = {}
    for name, s in unpack_artifact(artifact.read_bytes(), artifact)[0].items():
        if s.values.ndim == 2 and name.endswith(".weight"):
            kind = (weight_group(name), f"int{s.bits}" if s.bits else str(s.values.dtype).removeprefix("torch."))
            counts[kind] = counts.get(kind, 0) + 1
    return {group: f"{n}x{kind}" for (group, kind), n in counts.items()}


def test_loss_falls_and_artifact_is_written(single_run):
    cwd, out = single_run
    losses = logged_losses(out)
    assert losses[1] > 6.5  # ln(1024) = 6.93 at init
    assert losses[30] < losses[1] - 0.8, losses
    summary = final_summary(out)
    run_dir = cwd / "runs" / "single"
    artifact = run_dir / "final_model.int8_brotli.ptz"
    assert summary["bytes_model"] == artifact.stat().st_size
    shipped = run_dir / "train_gpt.py"  # the packed copy of the readable file, as records ship it
    assert shipped.read_text().startswith(PACKED_HEADER) and unpack_code(shipped.read_bytes()) == code_only(
        (ROOT / "train_gpt.py").read_bytes())
    assert summary["bytes_code"] == shipped.stat().st_size < (ROOT / "train_gpt.py").stat().st_size / 3
    assert summary["bytes_total"] == summary["bytes_model"] + summary["bytes_code"]
    assert summary["steps"] == 30 and summary["val_loss"] < losses[1] - 0.8
    log = (run_dir / "single.txt").read_text()
    assert log.startswith("config {") and (ROOT / "train_gpt.py").read_text() in log
    assert summary["score_line"] in log
    assert f"/single/train_gpt.py bytes:{summary['bytes_code']} (packed; " in log
    assert not list(run_dir.glob("*.tmp"))  # written under a temporary name, then renamed


def test_final_lines_have_the_documented_format(single_run):
    _, out = single_run
    lines = {}
    for kind in ("roundtrip", "sliding"):
        rt = re.search(rf"^final_int8_brotli_{kind} val_loss:([\d.]+) val_bpb:([\d.]+) eval_time:\d+ms$", out, re.M)
        exact = re.search(rf"^final_int8_brotli_{kind}_exact val_loss:(\d+\.\d{{8}}) val_bpb:(\d+\.\d{{8}})$",
                          out, re.M)
        assert rt and exact, kind
        assert abs(float(rt[2]) - float(exact[2])) < 1e-4
        lines[kind] = float(exact[2])
    summary = final_summary(out)
    assert abs(summary["val_bpb"] - lines["sliding"]) < 1e-8  # the score is the last evaluation
    assert set(summary["evals"]) == {"final_int8_brotli_roundtrip", "final_int8_brotli_sliding"}
    assert summary["score_line"].startswith("final_int8_brotli_sliding ")
    pre = re.search(r"^step:30/30 val_loss:[\d.]+ val_bpb:([\d.]+)", out, re.M)
    assert pre and abs(float(pre[1]) - lines["roundtrip"]) < 0.05  # int8 costs little
    assert re.search(r"^Total submission size int8\+brotli: \d+ bytes$", out, re.M)


def test_existing_run_folder_is_refused(single_run, small_data):
    cwd, _ = single_run
    before = (cwd / "runs" / "single" / "final_model.int8_brotli.ptz").read_bytes()
    result = run_script(tiny_env(small_data, RUN_ID="single", MICRO_BATCH_TOKENS=256), cwd, timeout=60)
    assert result.returncode == 2 and "RUN_ID" in result.stderr and "already exists" in result.stderr
    assert (cwd / "runs" / "single" / "final_model.int8_brotli.ptz").read_bytes() == before


def test_two_process_torchrun_matches_one_process(single_run, small_data, tmp_path):
    """Same global batch: 2 ranks x 4 micro-steps see the same sequences as 1 rank x 8, so the
    runs agree up to float reduction order."""
    _, single = single_run
    result = run_script(tiny_env(small_data, RUN_ID="ddp", MICRO_BATCH_TOKENS=256), tmp_path, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final_summary ") == 1  # rank 0 logs alone
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # eight ranks would print each warning eight times
    multi = final_summary(result.stdout)
    assert multi["world_size"] == 2 and multi["steps"] == 30
    one, two = logged_losses(single), logged_losses(result.stdout)
    assert abs(one[1] - two[1]) < 1e-4
    assert abs(one[30] - two[30]) < 0.03
    assert abs(final_summary(single)["val_bpb"] - multi["val_bpb"]) < 0.02


def test_dry_run_estimates_and_exits_without_training(tiny_data, tmp_path):
    env = tiny_env(tiny_data, MAX_WALLCLOCK_SECONDS=300, NUM_LAYERS=4, NUM_UNIQUE_LAYERS=2, GPTQ=1, GPTQ_BATCHES=4)
    result = run_script(env, tmp_path, timeout=120, script=ROOT / "scripts" / "dry_run.py")
    assert result.returncode == 0, result.stderr[-2000:]
    estimate = re.search(r"dry_run estimated_artifact_bytes:(\d+) \(fits", result.stdout)
    projected = re.search(r"dry_run step_ms:([\d.]+) tok/s:\d+ projected_steps:(\d+) in MAX_WALLCLOCK_SECONDS=300",
                          result.stdout)
    # the clock the run would have: 300 s less the calibration reserve timed as the run times it (not all 12 s)
    plan = re.search(r"gptq_calibration_plan batches_per_rank:4 of 4 batch_time:\S+ reserve:([\d.]+)s", result.stdout)
    assert estimate and projected and plan, result.stdout[-2000:]
    steps, step_ms, reserve = int(projected[2]), float(projected[1]), float(plan[1])
    assert reserve < 12
    clock_ms = 1000 * (300 - reserve)  # reserve is printed to 0.1 s, step_ms to 0.1 ms
    assert abs(steps - clock_ms / step_ms) <= 1 + (50 + clock_ms * 0.05 / step_ms) / step_ms
    assert "plan:[0, 1, 0, 1]" in result.stdout
    assert not (tmp_path / "runs").exists() and "final_summary" not in result.stdout


def test_eval_only_reproduces_the_artifact_score(single_run, small_data, tmp_path):
    cwd, out = single_run
    artifact = cwd / "runs" / "single" / "final_model.int8_brotli.ptz"
    # shape variables unlike the artifact's are refused, each named: they would be ignored
    refused = run_script(tiny_env(small_data, RUN_ID="again", EVAL_ONLY=artifact, MODEL_DIM=32, NUM_LAYERS=4,
                                  MLP_MULT=3), tmp_path, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert refused.stderr.startswith(f"error: EVAL_ONLY={artifact}: NUM_LAYERS=4 (the artifact's: 2), MODEL_DIM=32 "
                                     "(the artifact's: 64), MLP_MULT=3 (the artifact's: 4.0): not what the artifact")
    # none set: the artifact's own model settings are used (no retyping)
    shape = ("MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "NUM_LAYERS", *PLAIN_SHAPE)
    env = {k: v for k, v in tiny_env(small_data, RUN_ID="again", EVAL_ONLY=artifact).items() if k not in shape}
    result = run_script(env, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    again, original = final_summary(result.stdout), final_summary(out)
    assert again["val_bpb"] == original["val_bpb"] and again["bytes_model"] == original["bytes_model"]
    assert "step:" not in result.stdout  # no training


def test_eval_only_reexports_the_float_checkpoint(single_run, small_data, tmp_path):
    """The tiny model's matrices are all under KEEP_FLOAT_MAX_NUMEL: 'int6' changes only the name, the
    artifact keeps them in float16, and the re-export scores exactly as the run's artifact (the same weights)."""
    cwd, out = single_run
    checkpoint = cwd / "runs" / "single" / "final_model.float.pt"
    env = tiny_env(small_data, RUN_ID="int6", EVAL_ONLY=checkpoint, QUANT_BITS_ATTN=6, QUANT_BITS_MLP=6,
                   QUANT_BITS_EMBED=6, COMPRESSOR="zstd")
    result = run_script(env, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    int6, int8 = final_summary(result.stdout), final_summary(out)
    artifact = tmp_path / "runs/int6/final_model.int6_zstd.ptz"
    assert "final_int6_zstd_sliding" in int6["evals"]
    assert stored_matrices(artifact) == dict(attn="8xfloat16", mlp="4xfloat16", embed="1xfloat16")
    assert int6["val_bpb"] == int8["val_bpb"]


@pytest.mark.parametrize("overrides, culprit", [(dict(MODEL_DIM=32), "does not fit"), (dict(), "file not found")])
def test_eval_only_errors_name_the_variable(single_run, small_data, tmp_path, overrides, culprit):
    cwd, _ = single_run
    source = cwd / "runs" / "single" / ("final_model.float.pt" if overrides else "missing.ptz")
    result = run_script(tiny_env(small_data, EVAL_ONLY=source, **overrides), tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "EVAL_ONLY=" in result.stderr and culprit in result.stderr


def test_gptq_export_of_the_float_checkpoint(single_run, small_data, tmp_path):
    cwd, _ = single_run
    env = tiny_env(small_data, RUN_ID="gptq", EVAL_ONLY=cwd / "runs" / "single" / "final_model.float.pt", GPTQ=1,
                   GPTQ_BATCHES=2, QUANT_BITS_ATTN=6, QUANT_BITS_MLP=6, QUANT_BITS_EMBED=6)
    result = run_script(env, tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    # 2 blocks x (c_q for q/k/v, attn.proj, mlp.fc, mlp.proj) + the head's
    assert re.search(r"^gptq_calibration hessians:9 batches:2 tokens:4096 time:[\d.]+s", result.stdout, re.M)
    assert "final_int6gptq_brotli_sliding" in final_summary(result.stdout)["evals"]


def test_eval_budget_is_estimated_and_enforced(single_run, small_data, tmp_path):
    _, out = single_run
    assert re.search(r"^eval_budget_estimate roundtrip:[\d.]+s sliding:[\d.]+s total:[\d.]+s budget:600s$", out,
                     re.M), out[-2000:]
    refused = run_script(tiny_env(small_data, RUN_ID="over", EVAL_BUDGET_S="0.000001"), tmp_path, timeout=120)
    assert refused.returncode == 2 and "EVAL_BUDGET_S=" in refused.stderr and "step:" not in refused.stdout
    assert not (tmp_path / "runs" / "over").exists()  # a refused run leaves no folder behind


def test_the_default_export_and_evaluation_end_to_end(tiny_data, tmp_path):
    """The defaults' pipeline (tiny_env pins the plain one) on a model wide enough for its MLP
    matrices and tied embedding to be quantized: EMA weights, GPTQ with std clip (int6 MLP, int8
    embedding from the final hidden states), brotli, then round trip, sliding and score-first TTT with the n-gram
    mixer (the score)."""
    from train_gpt import build_config

    d = build_config({})
    env = tiny_env(tiny_data, RUN_ID="defaults", QUANT_BITS_ATTN=d.quant_bits_attn, QUANT_BITS_MLP=d.quant_bits_mlp,
                   GPTQ=int(d.gptq), EMA_HORIZON=d.ema_horizon, EXPORT_WEIGHTS=d.export_weights, TTT_LR=d.ttt_lr,
                   MIX_ETA=d.mix_eta, TTT_CHUNK=1024, MODEL_DIM=128, MLP_MULT=4.5, GPTQ_BATCHES=4, ITERATIONS=20)
    result = run_script(env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out, summary = result.stdout, final_summary(result.stdout)
    assert "export_weights:ema (horizon 0.063)" in out and "gptq_calibration hessians:9 batches:4 tokens:8192 " in out
    assert re.search(r"^export_try:1 attn:int6/k12.85/gptq mlp:int6/k12.85/gptq embed:int8/k20/gptq "
                     r"codec:brotlix16 bytes:\d+ budget:\d+ fits ", out, re.M)
    assert re.search(r"^Serialized model mixedgptq\+brotli: \d+ bytes \([\d.]+ bits per parameter\)$", out, re.M)
    assert list(summary["evals"]) == [f"final_mixedgptq_brotli_{k}" for k in ("roundtrip", "sliding", "ttt_mix")]
    assert summary["score_line"].startswith("final_mixedgptq_brotli_ttt_mix ")
    assert re.search(r"^final_mixedgptq_brotli_ttt_mix_weights network,unigram,bigram,trigram:\[", out, re.M)
    artifact = tmp_path / "runs/defaults/final_model.mixedgptq_brotli.ptz"
    assert artifact.stat().st_size == summary["bytes_model"]
    assert stored_matrices(artifact) == dict(attn="8xfloat16", mlp="4xint6", embed="1xint8")
    sliding = summary["evals"]["final_mixedgptq_brotli_sliding"]["val_bpb"]
    assert sliding - 0.5 < summary["val_bpb"] < sliding - 0.05  # a 20-step model: the n-gram experts help (~0.25)
    averaged = re.search(r"^averaged_weights val_loss:[\d.]+ val_bpb:([\d.]+) \(before export\)$", out, re.M)
    roundtrip = summary["evals"]["final_mixedgptq_brotli_roundtrip"]["val_bpb"]
    assert averaged and abs(roundtrip - float(averaged[1])) < 0.02  # what quantization cost


def test_an_export_that_cannot_fit_exits_3_keeping_the_float_checkpoint(small_data, tmp_path):
    result = run_script(tiny_env(small_data, RUN_ID="over", ITERATIONS=2, TARGET_BYTES=150_000), tmp_path)
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: TARGET_BYTES: the model file needs ")
    run_dir = tmp_path / "runs" / "over"
    assert (run_dir / "final_model.float.pt").is_file() and not list(run_dir.glob("*.ptz*"))
    assert "export_try:1 " in result.stdout and "final_summary" not in result.stdout


def test_ttt_on_two_ranks_matches_one(single_run, small_data, tmp_path):
    """TTT's gradients are summed over ranks and each rank scores a share of every chunk: two
    processes must adapt and score like one, up to float reduction order."""
    cwd, out = single_run
    artifact = cwd / "runs" / "single" / "final_model.int8_brotli.ptz"
    scores = {}
    for nproc in (1, 2):
        env = tiny_env(small_data, RUN_ID=f"ttt{nproc}", EVAL_ONLY=artifact, TTT_LR=0.05, TTT_CHUNK=1024)
        result = run_script(env, tmp_path, nproc=nproc, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[nproc] = final_summary(result.stdout)["evals"]
    one, two = (scores[n]["final_int8_brotli_ttt"]["val_bpb"] for n in (1, 2))
    sliding = scores[1]["final_int8_brotli_sliding"]["val_bpb"]
    assert sliding == final_summary(out)["val_bpb"]  # the artifact scores as in its run
    assert abs(one - sliding) > 1e-4  # TTT changed the score
    assert abs(one - two) < 1e-4, (one, two)


def test_train_only_stops_after_the_pre_export_score(small_data, tmp_path):
    result = run_script(tiny_env(small_data, RUN_ID="trainonly", TRAIN_ONLY=1, EMA_HORIZON="0.2", EXPORT_WEIGHTS="ema"),
                        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = final_summary(result.stdout)
    assert summary["score_line"].startswith("pre_export ") and summary["bytes_model"] == 0
    assert summary["val_bpb"] == summary["evals"]["pre_export"]["val_bpb"] and list(summary["evals"]) == ["pre_export"]
    files = {p.name for p in (tmp_path / "runs" / "trainonly").iterdir()}
    assert files == {"trainonly.txt", "final_model.float.pt"}  # no artifact, no final evaluations
    assert "final_" not in "".join(line for line in result.stdout.splitlines() if not line.startswith("final_summary"))


@pytest.mark.slow
def test_eval_only_scores_an_artifact_with_phased_lora_ttt(single_run, small_data, tmp_path):
    """EVAL_ONLY with TTT_ADAPTER=lora: the score is the per-document LoRA TTT line, logged with its exact twin;
    the artifact's sliding score is as in its run, and a global phase (TTT_PHASES) moves the LoRA score."""
    cwd, out = single_run
    artifact = cwd / "runs" / "single" / "final_model.int8_brotli.ptz"
    scores = {}
    for phases in ("2", ""):
        env = tiny_env(small_data, RUN_ID=f"lora{phases}", EVAL_ONLY=artifact, TTT_ADAPTER="lora", TTT_LR=0.05,
                       TTT_LORA_LR=0.01, TTT_LORA_RANK=4, TTT_PHASES=phases, VAL_BATCH_SIZE=1024,  # 16 rows
                       TTT_CHUNK=1024)  # the phase's SGD steps (the budget check primes them at TTT_CHUNK tokens)
        result = run_script(env, tmp_path, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        line = re.search(r"^final_int8_brotli_ttt_lora val_loss:[\d.]+ val_bpb:([\d.]+) eval_time:\d+ms$",
                         result.stdout, re.M)
        exact = re.search(r"^final_int8_brotli_ttt_lora_exact val_loss:\d+\.\d{8} val_bpb:(\d+\.\d{8})$",
                          result.stdout, re.M)
        assert line and exact, result.stdout[-2000:]
        summary = final_summary(result.stdout)
        assert list(summary["evals"]) == [f"final_int8_brotli_{k}" for k in ("roundtrip", "sliding", "ttt_lora")]
        assert summary["score_line"].startswith("final_int8_brotli_ttt_lora ")
        assert abs(summary["val_bpb"] - float(exact[1])) < 1e-8 and abs(float(line[1]) - float(exact[1])) < 1e-4
        sliding = summary["evals"]["final_int8_brotli_sliding"]["val_bpb"]
        assert abs(sliding - final_summary(out)["val_bpb"]) < 1e-6  # as in its run (smaller batches)
        scores[phases] = float(exact[1])
    assert scores["2"] != scores[""]  # the phase's SGD steps on documents 0..1 changed the later documents' scores


@pytest.mark.slow
def test_mixer_on_an_artifact_names_its_line_and_scores_alike_on_two_ranks(single_run, small_data, tmp_path):
    """EVAL_ONLY with MIX_ETA: the score is final_..._sliding_mix, its weights are logged, and two ranks (each
    counting every chunk itself, gradients summed) score as one."""
    cwd, out = single_run
    artifact = cwd / "runs" / "single" / "final_model.int8_brotli.ptz"
    scores = {}
    for nproc in (1, 2):
        env = tiny_env(small_data, RUN_ID=f"mix{nproc}", EVAL_ONLY=artifact, MIX_ETA=1, MIX_BUCKETS=4096,
                       TTT_CHUNK=1024)
        result = run_script(env, tmp_path, nproc=nproc, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = final_summary(result.stdout)
        assert list(summary["evals"]) == ["final_int8_brotli_roundtrip", "final_int8_brotli_sliding_mix"]
        assert summary["score_line"].startswith("final_int8_brotli_sliding_mix ")
        weights = r"^final_int8_brotli_sliding_mix_weights network,unigram,bigram,trigram:\["
        assert re.search(weights, result.stdout, re.M)
        scores[nproc] = summary["val_bpb"]
    assert abs(scores[1] - final_summary(out)["val_bpb"]) > 1e-4  # the mixer changed the score
    assert abs(scores[1] - scores[2]) < 1e-4, scores
