"""Stop signals as schedulers send them: one SIGTERM or SIGINT to torchrun only, to the workers only, or to every
process of the job (each worker then gets two within milliseconds: its own and torchrun's copy) ends in a checkpoint
at the step's end and exit code 5, and RESUME then ends exactly as a run never stopped. A later signal, or one that
finds no training, stops at once."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import ROOT, clean_environ, run_script, tiny_env
from train_gpt import (GPT, Interrupted, Runtime, WeightAverages, build_config, build_optimizers,
                       make_train_loader, plan_for, train, training_repeats)


# Two micro-steps a step on one rank (one on two), the EMA carried by the checkpoint and exported; no sliding window.
CHAIN = dict(ITERATIONS=18, TRAIN_LOG_EVERY=1, EVAL_STRIDE=0, EMA_HORIZON=0.2, EXPORT_WEIGHTS="ema",
             TRAIN_BATCH_TOKENS=1024, MICRO_BATCH_TOKENS=512)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def deliver(proc: subprocess.Popen, nproc: int, delivery: str, sig: int) -> None:
    """launcher: torchrun alone (it forwards the signal to every worker; Ctrl-C in its terminal, or a signal to its
    process group: torch 2.13 starts each worker in a session of its own); workers: each worker; job: torchrun and
    each worker, as a scheduler that signals every process of the job (each worker gets two within milliseconds)."""
    workers = children(proc.pid)
    assert len(workers) == nproc
    targets = {"launcher": [proc.pid], "workers": workers, "job": [proc.pid, *workers]}[delivery]
    for pid in targets:
        os.kill(pid, sig)


def interrupted_segment(env: dict, cwd: Path, nproc: int, delivery: str, sig: int, at_step: int):
    """Run until the log shows step `at_step`, deliver the signal; return (exit code, stdout, stderr)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen([sys.executable, *launcher, str(ROOT / "train_gpt.py")], cwd=cwd, text=True,
                            env={**clean_environ(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step:{at_step}/"):
            deliver(proc, nproc, delivery, sig)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out, err


def worker_traceback(err: str) -> bool:
    """Whether a worker died of an exception (torchrun prefixes its lines with [rankN]: and adds a traceback of its
    own, for the signal it got or the worker that failed)."""
    return bool(re.search(r"^\[rank\d+\]:", err, re.M))


def final_scores(output: str) -> list[str]:
    return re.findall(r"^final_\w+_exact .*$", output, re.M)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, deliveries", [
    (1, [("launcher", signal.SIGINT), ("workers", signal.SIGTERM), ("job", signal.SIGTERM)]),
    (2, [("job", signal.SIGTERM), ("launcher", signal.SIGTERM), ("workers", signal.SIGINT)]),
])
def test_every_delivery_checkpoints_and_resumes_exactly(small_data, tmp_path, nproc, deliveries):
    """One run stopped by each delivery in turn, resumed after each, ends bit for bit as the run never stopped."""
    env = tiny_env(small_data, **CHAIN)
    whole = run_script({**env, "RUN_ID": "whole"}, tmp_path, nproc=nproc)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run, step = tmp_path / "runs" / "cut", 0
    for k, (delivery, sig) in enumerate(deliveries):
        resume = {"RESUME": str(run)} if k else {}
        code, out, err = interrupted_segment({**env, "RUN_ID": "cut", **resume}, tmp_path, nproc, delivery, sig,
                                             at_step=step + 3)
        name = signal.Signals(sig).name
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (delivery, err[-3000:])
        stopped = re.fullmatch(rf"error: {name} received: training stopped after step (\d+), wrote a checkpoint, "
                               rf"exported nothing; continue with RESUME={re.escape(str(run)) if k else 'runs/cut'}",
                               errors[0])
        assert stopped and not worker_traceback(err), (delivery, err[-3000:])
        assert code == 1, (delivery, code)  # torchrun exits 1 whatever its workers' code: 5 is in its report and log
        assert delivery != "workers" or re.search(r"exitcode\s*: 5 ", err)  # a worker's exit, not a signal to it
        step = int(stopped[1])
        assert step >= k * 3 + 3 and step < 18
        assert sorted(p.name for p in (run / "checkpoint").iterdir()) == \
            ["checkpoint.json"] + [f"step{step}.rank{r}.pt" for r in range(max(nproc, 1))]
        assert (run / "cut.txt").read_text().rstrip().endswith(f"{errors[0]}\nexit_code:5")
    resumed = run_script({**env, "RUN_ID": "cut", "RESUME": str(run)}, tmp_path, nproc=nproc)
    assert resumed.returncode == 0 and f"resume step:{step} " in resumed.stdout, resumed.stderr[-3000:]
    ends = [torch.load(tmp_path / "runs" / name / "final_model.float.pt") for name in ("whole", "cut")]
    for kind in ("last", "ema"):
        assert all(torch.equal(ends[0][kind][k], ends[1][kind][k]) for k in ends[0][kind]), kind
    assert final_scores(resumed.stdout) == final_scores(whole.stdout) and final_scores(whole.stdout)


@pytest.fixture
def watched():
    """The run's signal watch in this process, torn down afterwards (handlers, wakeup pipe, state)."""
    train_gpt.watch_stop_signals()
    train_gpt.TRAINING_LOOP[0] = True
    yield
    train_gpt.TRAINING_LOOP[0] = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.close(signal.set_wakeup_fd(-1))  # the watcher thread ends
    train_gpt.STOP_SIGNALS.clear()
    train_gpt.SIGNAL_STATE.update(stop_now=False, stopping=False)


def settle() -> None:
    """Let the watcher thread and Python's handler run."""
    for _ in range(20):
        time.sleep(0.01)


def test_signals_within_the_window_are_one_delivery_and_a_later_one_stops_at_once(watched):
    for _ in range(3):  # a burst, as a job's signal and torchrun's copies
        os.kill(os.getpid(), signal.SIGTERM)
    settle()
    assert train_gpt.STOP_SIGNALS == ["SIGTERM"] and not train_gpt.SIGNAL_STATE["stop_now"]  # polled by the loop
    time.sleep(train_gpt.SIGNAL_WINDOW_S)
    with pytest.raises(Interrupted, match="^SIGINT received again: stopped at once; the last whole checkpoint stays"):
        os.kill(os.getpid(), signal.SIGINT)
        settle()
    os.kill(os.getpid(), signal.SIGINT)  # stopping already: nothing left to stop
    settle()
    assert train_gpt.STOP_SIGNALS == ["SIGTERM", "SIGINT"]


def test_a_copy_handled_late_counts_by_its_arrival(watched):
    """The main thread handles the first signal, then is busy in C code (a CUDA sync, a collective, a long write)
    while torchrun's copy arrives: Python runs the handler two seconds late, the copy still counts as a copy."""
    os.kill(os.getpid(), signal.SIGTERM)
    settle()
    copy = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the copy lands in another thread, as in C code
    try:
        copy.start()
        time.sleep(2 * train_gpt.SIGNAL_WINDOW_S)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    settle()  # the handler runs now, 2 s after the copy arrived
    assert train_gpt.STOP_SIGNALS == ["SIGTERM"] and not train_gpt.SIGNAL_STATE["stopping"]


def test_a_signal_outside_training_stops_at_once(watched):
    train_gpt.TRAINING_LOOP[0] = False
    with pytest.raises(Interrupted, match="^SIGTERM received outside a training step: stopped"):
        os.kill(os.getpid(), signal.SIGTERM)
        settle()


def test_a_signal_during_the_final_validation_writes_the_last_checkpoint(tiny_data, tmp_path, watched):
    """No step follows the final validation to poll a signal that came during it: the loop asks once more, so the
    run stops with a checkpoint of its last step (RESUME then validates and exports) rather than being killed."""
    cfg, rt = build_config(tiny_env(tiny_data, ITERATIONS=3)), Runtime(0, 1, 0, torch.device("cpu"))
    model = GPT(cfg)
    loader = make_train_loader(cfg, rt)

    def validate():  # VAL_LOSS_EVERY=0: only the final one; a scheduler's SIGTERM arrives while it runs
        os.kill(os.getpid(), signal.SIGTERM)
        settle()
        return 5.0, 3.0
    with pytest.raises(Interrupted, match="^SIGTERM received: training stopped after step 3, wrote a checkpoint"):
        train(model, model, cfg, rt, {r: plan_for(cfg, r) for r in training_repeats(cfg)},
              build_optimizers(cfg, model, 0, 1, fused=False), loader, validate, WeightAverages(cfg, model), tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())["step"] == 3


@pytest.mark.slow
def test_a_signal_during_the_export_stops_every_rank_with_one_line(small_data, tmp_path):
    """Two ranks; rank 0 is exporting (the others wait in a collective) when torchrun forwards SIGTERM: exit 5 on
    every rank, one line, no artifact, and the float checkpoint that EVAL_ONLY re-exports is whole."""
    env = {**clean_environ(), **tiny_env(small_data, RUN_ID="exp", **CHAIN)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("export_weights:"):  # the float checkpoint is written; the export starts
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    run = tmp_path / "runs" / "exp"
    assert proc.returncode == 1 and errors == ["error: SIGTERM received outside a training step: stopped; no partial "
                                               "file is left; training had ended: EVAL_ONLY=runs/exp/final_model."
                                               "float.pt exports and scores it"], err[-3000:]
    assert not list(run.glob("*.ptz")) and "exit_code:5" in (run / "exp.txt").read_text()
    assert torch.load(run / "final_model.float.pt")["ema"] is not None
