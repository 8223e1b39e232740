"""Checkpoint and resume: a run stopped by SIGTERM and continued with RESUME ends with the weights and scores
of a run never stopped, on one process and on two; what cannot be resumed is refused in one line."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, clean_environ, final_summary, logged_losses, run_script, tiny_env
from train_gpt import (GPT, RESUME_FREE_KNOBS, ConfigError, Interrupted, Runtime, ShuffledLoader, TrainState, UserError,
                       WeightAverages, build_config, build_optimizers, check_free_space, check_inputs, find_shards,
                       load_checkpoint, make_train_loader, plan_for, save_checkpoint, train_step, training_repeats,
                       warmup)

# Everything a checkpoint must carry moves in these runs: the depth grows (1 core pass, then 2 from t = 0.2),
# EMA and SWA run from then on, micro-steps (4 a step on one rank, 2 on two) read the shuffled batches, validation
# every 20 steps.
RESUMABLE = dict(ITERATIONS=60, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=20, NUM_UNIQUE_LAYERS=1, PROG_DEPTH="0.2:1,1.0:2",
                 EMA_HORIZON=0.2, SWA_START=0.2, SWA_EVERY=3, EXPORT_WEIGHTS="swa", MICRO_BATCH_TOKENS=512)


def interrupt(env: dict, cwd, nproc: int, at_step: int) -> tuple[int, str]:
    """Start a run and send it SIGTERM once it logs step `at_step` (torchrun passes it on to every rank);
    return its exit code and stderr."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    proc = subprocess.Popen([sys.executable, *launcher, str(ROOT / "train_gpt.py")], cwd=cwd, text=True,
                            env={**clean_environ(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith(f"step:{at_step}/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


# What RESUME may change (RESUME_FREE_KNOBS), each changed in the resumed part below: training logs every 7 steps
# (not 1), validates every 15 (not 20), writes no periodic checkpoint (the interrupted part: every 0.05 s), eager.
OTHER_LOGGING = dict(TRAIN_LOG_EVERY="7", VAL_LOSS_EVERY="15", CHECKPOINT_EVERY="0", COMPILE="0", ATTN_BACKEND="sdpa")


def validations(output: str) -> dict[int, str]:
    """The validation lines during training, by step."""
    return {int(m[1]): m[0] for m in re.finditer(r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:\S+", output, re.M)}


def final_scores(output: str) -> list[str]:
    return re.findall(r"^final_\w+_exact .*$", output, re.M)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2])
def test_a_resumed_run_with_other_logging_ends_exactly_as_an_uninterrupted_one(small_data, tmp_path, nproc):
    """The resumed part logs, validates and checkpoints on other schedules (all RESUME accepts): it ends bit for bit
    as the run never stopped, so none of them touches what training computes."""
    env = tiny_env(small_data, **RESUMABLE)
    whole = run_script({**env, "RUN_ID": "whole"}, tmp_path, nproc=nproc)
    assert whole.returncode == 0, whole.stderr[-3000:]

    code, err = interrupt({**env, "RUN_ID": "cut", "CHECKPOINT_EVERY": "0.05"}, tmp_path, nproc, at_step=25)
    stopped = re.search(r"^error: SIGTERM received: training stopped after step (\d+), wrote a checkpoint", err, re.M)
    assert stopped and code == (5 if not nproc else 1), err[-3000:]  # torchrun exits 1 when its workers fail
    stopped = int(stopped[1])
    run = tmp_path / "runs" / "cut"
    assert 25 <= stopped < 60 and f"\ncheckpoint step:{stopped} time:" in (run / "cut.txt").read_text()
    ranks = max(nproc, 1)  # CHECKPOINT_EVERY wrote earlier ones too: only the last is kept
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == \
        ["checkpoint.json"] + [f"step{stopped}.rank{r}.pt" for r in range(ranks)]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "cut.txt"]  # nothing exported
    if not nproc:
        check_a_damaged_checkpoint_is_refused(env, run, stopped, tmp_path)

    resumed = run_script({**env, **OTHER_LOGGING, "RUN_ID": "cut", "RESUME": str(run)}, tmp_path, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume step:{stopped} " in resumed.stdout and "warmup_step:" in resumed.stdout
    assert not (run / "checkpoint").exists()  # the float checkpoint replaced it
    ends = [torch.load(tmp_path / "runs" / name / "final_model.float.pt") for name in ("whole", "cut")]
    for kind in ("last", "ema", "swa"):
        assert ends[0][kind].keys() == ends[1][kind].keys()
        assert all(torch.equal(ends[0][kind][k], ends[1][kind][k]) for k in ends[0][kind]), kind
    assert final_scores(resumed.stdout) == final_scores(whole.stdout) and len(final_scores(whole.stdout)) == 2
    # validated on the resumed part's schedule; where both runs validated, the same line
    ran, never_stopped = validations(resumed.stdout), validations(whole.stdout)
    assert set(ran) == {s for s in range(stopped, 61) if s % 15 == 0 or s == 60}, (stopped, sorted(ran))
    assert 60 in ran and all(ran[s] == never_stopped[s] for s in set(ran) & set(never_stopped))
    # train losses logged every 7 steps (and the last), each the uninterrupted run's
    losses, every_step = logged_losses(resumed.stdout), logged_losses(whole.stdout)
    assert set(losses) == {s for s in range(stopped + 1, 61) if s % 7 == 0 or s == 60}, (stopped, sorted(losses))
    assert losses == {s: every_step[s] for s in losses}
    summaries = final_summary(whole.stdout), final_summary(resumed.stdout)
    assert summaries[0]["val_bpb"] == summaries[1]["val_bpb"] and summaries[1]["steps"] == 60
    log = (run / "cut.txt").read_text()  # one log: the first part, the stop, the rest
    assert log.count("\nconfig {") == 1 and log.startswith("config {") and "\nerror: SIGTERM" in log
    assert log.index("\nerror: SIGTERM") < log.index(f"\nresume step:{stopped} ") < log.index("\nfinal_summary ")


def check_a_damaged_checkpoint_is_refused(env: dict, run, step: int, tmp_path) -> None:
    copy = tmp_path / "runs" / "damaged"
    shutil.copytree(run, copy)
    part = copy / "checkpoint" / f"step{step}.rank0.pt"
    part.write_bytes(part.read_bytes()[:-1000])
    result = run_script({**env, "RUN_ID": "cut", "RESUME": str(copy)}, tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: RESUME={copy}: the checkpoint file of rank 0 is missing, partial")


def fake_checkpoint(folder, cfg) -> None:
    """The manifest that a run with `cfg` leaves beside its checkpoint files: all check_inputs reads."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "checkpoint.json").write_text(json.dumps(dict(step=3, config=dataclasses.asdict(cfg))))


@pytest.mark.parametrize("change, world_size, culprit", [
    (dict(MATRIX_LR="0.03"), 1, ": MATRIX_LR differ"), (dict(SEED="1", MUON_MOMENTUM="0.9"), 1, ": SEED, MUON_MOMENTUM"),
    (dict(), 2, ": WORLD_SIZE"), (dict(), 0, "no complete checkpoint there"),
])
def test_resume_refuses_what_it_cannot_continue_in_one_line(tiny_data, tmp_path, change, world_size, culprit):
    if world_size:
        fake_checkpoint(tmp_path, build_config(tiny_env(tiny_data)))
    cfg = build_config(tiny_env(tiny_data, RESUME=tmp_path, **change), max(world_size, 1))
    with pytest.raises(ConfigError, match=f"^RESUME={tmp_path}.*{culprit}"):
        check_inputs(cfg)


def test_resume_accepts_other_logging_and_checkpointing(tiny_data, tmp_path):
    """Every setting RESUME may change, changed, is accepted; with one training setting changed too, that one alone
    is named (the manifest was read, the others are left out on purpose). The slow test above resumes a real run
    with them changed and ends bit for bit as the run never stopped."""
    fake_checkpoint(tmp_path, build_config(tiny_env(tiny_data)))
    free = dict(OTHER_LOGGING, CHECKPOINT_EVERY=60, OUT_DIR=tmp_path / "elsewhere", EXPORT_RESERVE_SECONDS=5)
    assert {k.lower() for k in free} | {"resume"} == set(RESUME_FREE_KNOBS)  # a new free knob is added here too
    check_inputs(build_config(tiny_env(tiny_data, RESUME=tmp_path, **free)))
    with pytest.raises(ConfigError, match=f"^RESUME={tmp_path}: MATRIX_LR differ from the interrupted run's"):
        check_inputs(build_config(tiny_env(tiny_data, RESUME=tmp_path, MATRIX_LR="0.03", **free)))


def test_resume_accepts_a_checkpoint_that_names_a_knob_taken_out_since(tiny_data, tmp_path):
    cfg = build_config(tiny_env(tiny_data))
    (tmp_path / "checkpoint").mkdir()  # written before WARMDOWN_ITERS left: its manifest still names it
    manifest = dict(step=3, config={**dataclasses.asdict(cfg), "warmdown_iters": 0})
    (tmp_path / "checkpoint" / "checkpoint.json").write_text(json.dumps(manifest))
    check_inputs(build_config(tiny_env(tiny_data, RESUME=tmp_path)))
    with pytest.raises(ConfigError, match=f"^RESUME={tmp_path}: SEED differ"):  # the manifest is read: not WARMDOWN_ITERS
        check_inputs(build_config(tiny_env(tiny_data, RESUME=tmp_path, SEED=1)))


def tiny_training(tiny_data):
    cfg = build_config(tiny_env(tiny_data, EMA_HORIZON=0.2))
    model = GPT(cfg)
    optimizers = build_optimizers(cfg, model, 0, 1, fused=False)
    parts = dict(model=model, averages=WeightAverages(cfg, model), optimizer0=optimizers[0], optimizer1=optimizers[1])
    return cfg, model, parts


def test_the_compile_warmup_leaves_no_trace_in_the_training_that_follows(tiny_data):
    """WARMUP_STEPS trains on real batches to compile and prime (every depth, here 1 and 2 core passes), then puts
    the weights and every optimizer state back: the steps after it are bit for bit the steps without it. (A warmup
    that kept, say, Muon's momentum would train before the clock starts: the 2026-04-27 record's sharded Muon
    keeps its momentum outside its state_dict, so its restore leaves the warmup's momentum in place.)"""
    cfg = build_config(tiny_env(tiny_data, WARMUP_STEPS=4, NUM_UNIQUE_LAYERS=1, PROG_DEPTH="0.5:1,1.0:2"))
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    plans = {passes: plan_for(cfg, passes) for passes in training_repeats(cfg)}
    runs = []
    for warm in (True, False):
        torch.manual_seed(cfg.seed)
        model = GPT(cfg)
        optimizers = build_optimizers(cfg, model, 0, 1, fused=False)
        if warm:
            warmup(model, model, cfg, rt, plans, optimizers, lambda: make_train_loader(cfg, rt))
            assert all(not opt.state for opt in optimizers)  # no momentum, no Adam moments, no step counts
        loader = make_train_loader(cfg, rt)
        losses = [train_step(model, loader, rt, cfg, plans[passes], optimizers).item() for passes in (1, 2, 2)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (warm_losses, warm_weights), (cold_losses, cold_weights) = runs
    assert warm_losses == cold_losses and all(torch.equal(a, b) for a, b in zip(warm_weights, cold_weights))


def test_a_signal_during_a_checkpoint_write_leaves_the_previous_one(tiny_data, tmp_path, monkeypatch):
    cfg, model, parts = tiny_training(tiny_data)
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    parts["averages"].update(1, 0.1, True)
    save_checkpoint(tmp_path / "checkpoint", cfg, rt, parts, TrainState(step=1, elapsed_ms=10.0))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def killed(path, data):  # as if a second SIGTERM arrived halfway through the write
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        raise Interrupted("SIGTERM received outside a training step")

    monkeypatch.setattr(Path, "write_bytes", killed)
    with pytest.raises(Interrupted):
        save_checkpoint(tmp_path / "checkpoint", cfg, rt, parts, TrainState(step=2, elapsed_ms=20.0))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == \
        ["checkpoint.json", "step1.rank0.pt", "step2.rank0.pt.tmp"]  # the half-written file keeps its temporary name
    assert json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())["step"] == 1
    resumed = build_config(tiny_env(tiny_data, EMA_HORIZON=0.2, RESUME=tmp_path))
    loader = ShuffledLoader(find_shards(str(tiny_data), "train"), 0, 1, 32, 64, torch.device("cpu"), cfg.seed)
    state = load_checkpoint(resumed, rt, parts, loader)
    assert state.step == 1 and state.elapsed_ms == 10.0 and loader.position == 32  # one step's windows
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    names = [name for name, _ in model.named_parameters()]  # the EMA's first update copied the weights
    assert parts["averages"].last_t == 0.1 and all(torch.equal(saved[n], e) for n, e in zip(names, parts["averages"].ema))


def test_too_little_free_space_is_refused_naming_the_folder(tiny_data, tmp_path, monkeypatch):
    _, model, _ = tiny_training(tiny_data)
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    check_free_space(rt, model, tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    with pytest.raises(UserError, match=f"^{tmp_path}: 0.00 GB free on its disk; the run may write "):
        check_free_space(rt, model, tmp_path)


def test_a_checkpoint_of_another_script_version_is_refused_in_one_line(tiny_data, tmp_path):
    cfg, model, parts = tiny_training(tiny_data)
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    save_checkpoint(tmp_path / "checkpoint", cfg, rt, parts, TrainState(step=1, elapsed_ms=10.0))
    path = tmp_path / "checkpoint" / "step1.rank0.pt"  # rewritten whole (valid checksum) with a field this version lacks
    snapshot = torch.load(io.BytesIO(path.read_bytes()[32:]), weights_only=True)
    snapshot["state"]["switched_at"] = 3
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    path.write_bytes(hashlib.sha256(buffer.getvalue()).digest() + buffer.getvalue())
    resumed = build_config(tiny_env(tiny_data, EMA_HORIZON=0.2, RESUME=tmp_path))
    loader = ShuffledLoader(find_shards(str(tiny_data), "train"), 0, 1, 32, 64, torch.device("cpu"), cfg.seed)
    with pytest.raises(UserError, match=f"^RESUME={tmp_path}: checkpoint written by another version of this script"):
        load_checkpoint(resumed, rt, parts, loader)
