"""scripts/sweep.py: a grid of two tiny CPU runs, resumed (a finished run is not run again, an
unfinished one is moved aside and run again), its table and plots, and the schedules it draws;
--lanes, checkpoints and SIGTERM with a stand-in for train_gpt.py that sleeps, notes when it ran and
what it was given, and on SIGTERM writes a checkpoint and exits 5 as train_gpt.py does."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, clean_environ, tiny_env

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402
from runlog import read_log  # noqa: E402

GRID = ("--grid", "MATRIX_LR=0.02,0.05", "--seeds", "1", "--set", "NUM_UNIQUE_LAYERS=1", "--set",
        "PROG_DEPTH=0.5:1,1.0:2")  # one shared block: 1 pass for the first half, then 2
RUNS = ("matrix_lr0.02_seed1", "matrix_lr0.05_seed1")
# one worker for the module under `pytest -n 2 --dist loadgroup`: its fixture (a sweep) is built once
pytestmark = pytest.mark.xdist_group("sweep")


def run_sweep(data: Path, out: Path, *args) -> subprocess.CompletedProcess:
    env = {**clean_environ(), **tiny_env(data, ITERATIONS=8, TRAIN_LOG_EVERY=2, EVAL_STRIDE=32)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def swept(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "lr"
    result = run_sweep(small_data, out, *GRID)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, result.stdout


def log_of(out: Path, run: str) -> Path:
    return out / "runs" / run / f"{run}.txt"


@pytest.mark.slow
def test_table_sorted_by_score_and_plots(swept):
    out, stdout = swept
    scores = {run: read_log(out / "runs" / run).summary["val_bpb"] for run in RUNS}
    table = (out / "table.md").read_text()
    assert table in stdout.replace("\r", "")
    rows = [line for line in table.splitlines() if line.startswith("| MATRIX_LR=")]
    assert rows[0].startswith("| MATRIX_LR=0.0") and len(rows) == 4  # two runs, then the two settings' means
    best, worst = sorted(RUNS, key=scores.get)
    assert rows[0].startswith(f"| MATRIX_LR={best[9:13]} | 1 | 8 |")  # setting, seed, steps
    assert f"| {scores[best]:.4f} |" in rows[0] and f"| {scores[worst]:.4f} |" in rows[1]
    assert table.splitlines()[0] == ("| setting | seed | steps | ms/step | roundtrip bpb | sliding bpb "
                                     "| bytes total |")
    for name in ("train_loss.png", "val_bpb.png", f"schedule_{best}.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_finished_runs_are_not_rerun_and_unfinished_ones_restart(swept, small_data):
    out, _ = swept
    finished = log_of(out, RUNS[0]).read_bytes()
    before = log_of(out, RUNS[0]).stat().st_mtime_ns
    again = run_sweep(small_data, out, *GRID)
    assert again.returncode == 0 and again.stdout.count(": already finished") == 2, again.stdout[-2000:]
    assert "running" not in again.stdout and log_of(out, RUNS[0]).stat().st_mtime_ns == before
    # an interrupted run: its log stops before the final_summary line
    text = log_of(out, RUNS[1]).read_text()
    log_of(out, RUNS[1]).write_text(text[:text.index("\nfinal_summary ")])
    resumed = run_sweep(small_data, out, *GRID)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"{RUNS[0]}: already finished" in resumed.stdout and f"{RUNS[1]}: unfinished folder moved" in resumed.stdout
    assert read_log(out / "runs" / RUNS[1]).finished and log_of(out, RUNS[0]).read_bytes() == finished
    assert len(list((out / "interrupted").iterdir())) == 1


@pytest.mark.slow
def test_dry_run_checks_every_setting_first(tiny_data, tmp_path):
    plan = run_sweep(tiny_data, tmp_path / "s", "--grid", "WARMDOWN_FRAC=0.3,0.5", "--seeds", "7,8", "--dry-run")
    assert plan.returncode == 0 and plan.stdout.count("  new ") == 4 and not (tmp_path / "s").exists()
    assert "WARMDOWN_FRAC=0.5 SEED=8 RUN_ID=warmdown_frac0.5_seed8" in plan.stdout
    bad = run_sweep(tiny_data, tmp_path / "s", "--grid", "WARMDOWN_FRAC=0.3,1.5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and not (tmp_path / "s").exists()
    assert "run warmdown_frac1.5: WARMDOWN_FRAC=1.5: must be in [0, 1]" in bad.stderr


@pytest.mark.slow
def test_schedule_is_train_gpts_own(swept):
    """The plotted depth switch is the step the run logged; the LR falls to MIN_LR at the last step."""
    out, _ = swept
    log = read_log(out / "runs" / RUNS[0])
    steps, lr, passes = sweep.schedule(log)
    switch = int(re.search(r"^depth_switch step:(\d+)", log_of(out, RUNS[0]).read_text(), re.M)[1])
    assert passes[0] == 1 and passes[-1] == 2 and passes.index(2) + 1 == switch  # passes[s] runs step s + 1
    assert lr[0] == 1.0 and lr[-1] == log.config["min_lr"] and len(steps) == 9


def test_list_file_and_grid_make_the_product(tmp_path):
    settings = tmp_path / "settings.txt"
    settings.write_text("# shapes\nwide: MODEL_DIM=128 NUM_HEADS=4\nMODEL_DIM=64  # the default tiny one\n")
    args = sweep.parse_args(["--out", str(tmp_path / "o"), "--list", str(settings), "--grid",
                             "PROG_DEPTH=0.5:1,1.0:2|1.0:2", "--seeds", "1,2"])
    runs = sweep.plan_runs(args)
    assert [r.run_id for r in runs][:3] == ["wide_prog_depth0.5-1-1.0-2_seed1", "wide_prog_depth0.5-1-1.0-2_seed2",
                                            "wide_prog_depth1.0-2_seed1"]
    assert runs[4].run_id == "model_dim64_prog_depth0.5-1-1.0-2_seed1" and len(runs) == 8
    assert runs[0].env["PROG_DEPTH"] == "0.5:1,1.0:2" and runs[2].env["PROG_DEPTH"] == "1.0:2"
    assert runs[0].env["MODEL_DIM"] == "128" and runs[0].label == "wide PROG_DEPTH=0.5:1,1.0:2"
    assert runs[4].label == "MODEL_DIM=64 PROG_DEPTH=0.5:1,1.0:2"


# ---------------------------------------------------------------------------------------------
# --lanes, with a stand-in: the config line and final_summary train_gpt.py would write for these
# settings (so the sweep tabulates and resumes it), after sleeping seed x `seconds`; standin.json says when it ran,
# with which devices, port and threads. Like train_gpt.py, on SIGTERM (or, for `interrupt_seed`, after
# its step 2) it writes checkpoint/checkpoint.json and exits 5; with RESUME it checks that RESUME is its
# folder and holds that checkpoint, appends to its log and finishes (resumed.json: what it was given).
# ---------------------------------------------------------------------------------------------

STANDIN = """
import dataclasses, json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import train_gpt
cfg = train_gpt.build_config(os.environ, int(os.environ.get("WORLD_SIZE", "1")))
out = Path(cfg.out_dir)
out.mkdir(parents=True, exist_ok=True)
seen = dict(start=time.time(), pid=os.getpid(), **{{k: os.environ.get(k) for k in
            ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_PORT", "WORLD_SIZE", "RESUME")}})

def checkpoint_and_exit(*_):
    (out / "checkpoint").mkdir(exist_ok=True)
    (out / "checkpoint" / "step2.rank0.pt").write_bytes(b"weights")
    (out / "checkpoint" / "checkpoint.json").write_text(json.dumps(dict(step=2, config=dataclasses.asdict(cfg))))
    sys.exit(5)

signal.signal(signal.SIGTERM, checkpoint_and_exit)
if cfg.resume:
    if Path(cfg.resume) != out or not (out / "checkpoint" / "checkpoint.json").is_file():
        sys.exit(f"error: RESUME={{cfg.resume}}: no checkpoint of this run there")
    (out / "resumed.json").write_text(json.dumps(seen))
    log = open(out / f"{{cfg.run_id}}.txt", "a")
else:
    (out / "started.json").write_text(json.dumps(seen))
    log = open(out / f"{{cfg.run_id}}.txt", "w")
    log.write("config " + json.dumps(dataclasses.asdict(cfg)) + "\\n")
    print("step:2/4 train_loss:3.0 train_time:50ms", file=log, flush=True)
    if cfg.seed == {interrupt_seed}:
        checkpoint_and_exit()
    time.sleep({seconds} * cfg.seed)  # seed 1 ends first
if cfg.seed == {fail_seed}:
    sys.exit("error: the stand-in fails this seed")
bpb = 1 + cfg.seed / 100
print("step:4/4 train_loss:2.5 train_time:100ms", file=log)
print("step:4/4 val_loss:2.0 val_bpb:%.4f" % bpb, flush=True)
summary = dict(val_bpb=bpb, steps=4, train_time_ms=100, bytes_total=1000, seed=cfg.seed,
               evals={{"final_int8_roundtrip": dict(val_bpb=bpb)}})
(out / "standin.json").write_text(json.dumps(dict(seen, end=time.time())))
log.write("final_summary " + json.dumps(summary) + "\\n")
"""


def standin(tmp_path: Path, seconds: float = 1.0, fail_seed: int = -1, interrupt_seed: int = -1) -> Path:
    path = tmp_path / "standin.py"
    path.write_text(STANDIN.format(root=str(ROOT), seconds=seconds, fail_seed=fail_seed,
                                   interrupt_seed=interrupt_seed))
    return path


def sweep_command(out: Path, script: Path, *args) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--out", str(out), "--script", str(script),
            "--no-plots", *args]


def lanes_env(**extra) -> dict:
    env = {k: v for k, v in clean_environ().items() if k not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    return {**env, **extra}


def run_lanes(out: Path, script: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(out, script, *args), env=lanes_env(**env), capture_output=True, text=True,
                          timeout=240)


def seen(out: Path, run: str, name: str = "standin.json") -> dict:
    return json.loads((out / "runs" / run / name).read_text())


SEEDS = ("--seeds", "1,2,3", "--set", "MATRIX_LR=0.03")
SEED_RUNS = ("base_seed1", "base_seed2", "base_seed3")


@pytest.mark.slow
def test_lanes_run_side_by_side_each_on_its_own_gpu_and_resume(tmp_path):
    out, script = tmp_path / "lanes", standin(tmp_path)
    result = run_lanes(out, script, *SEEDS, "--lanes", "2", "--gpus", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    one, two, three = (seen(out, run) for run in SEED_RUNS)
    assert max(one["start"], two["start"]) < min(one["end"], two["end"])  # the first two ran at once
    assert {one["CUDA_VISIBLE_DEVICES"], two["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    assert three["start"] > one["end"] and three["CUDA_VISIBLE_DEVICES"] == one["CUDA_VISIBLE_DEVICES"]  # its lane
    threads = str(max(1, sweep.cpu_cores() // 2))
    assert all(s["OMP_NUM_THREADS"] == threads and s["MASTER_PORT"] is None for s in (one, two, three))
    table, means = (out / "table.md").read_text().split("\n\n")
    assert [row.split(" | ")[1] for row in table.splitlines()[2:]] == ["1", "2", "3"]  # every run, best first
    assert means.splitlines()[2] == "| base | 3 | 1.0200 | 0.0100 |" and means in result.stdout
    assert "lane 1: CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=" in result.stdout
    assert "  base_seed2: step:4/4 val_loss:2.0 val_bpb:1.0200" in result.stdout  # lanes' lines name their run
    # resumed: the finished runs are not run again, an unfinished one is
    log = out / "runs" / SEED_RUNS[1] / f"{SEED_RUNS[1]}.txt"
    log.write_text(log.read_text().split("final_summary ")[0])
    again = run_lanes(out, script, *SEEDS, "--lanes", "2", "--gpus", "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count(": already finished") == 2 and again.stdout.count(": running ") == 1
    assert f"{SEED_RUNS[1]}: unfinished folder moved" in again.stdout
    assert seen(out, SEED_RUNS[0]) == one and seen(out, SEED_RUNS[1])["start"] > two["end"]


@pytest.mark.slow
def test_a_failed_lane_run_stops_nothing_else(tmp_path):
    out = tmp_path / "lanes"
    result = run_lanes(out, standin(tmp_path, seconds=0.5, fail_seed=1), *SEEDS, "--lanes", "2", "--gpus", "0,1")
    assert result.returncode == 1 and "1 run(s) failed: base_seed1 " in result.stderr, result.stderr[-2000:]
    table = (out / "table.md").read_text()
    assert "| base | 2 |" in table and "| base | 3 |" in table and "| 1 |" not in table


@pytest.mark.slow
def test_torchrun_lanes_get_their_own_port_and_keep_a_set_omp_num_threads(tmp_path):
    out = tmp_path / "lanes"
    result = run_lanes(out, standin(tmp_path), "--seeds", "1,2", "--nproc", "1", "--lanes", "2", "--gpus", "5,2",
                       OMP_NUM_THREADS="3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = [seen(out, run) for run in SEED_RUNS[:2]]
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs)
    assert {(r["CUDA_VISIBLE_DEVICES"], r["MASTER_PORT"]) for r in runs} == {("5", "29505"), ("2", "29502")}
    assert all(r["OMP_NUM_THREADS"] == "3" and r["WORLD_SIZE"] == "1" for r in runs)


@pytest.mark.slow
def test_timeout_stops_each_lane_run(tmp_path):
    out, begin = tmp_path / "lanes", time.monotonic()
    result = run_lanes(out, standin(tmp_path, seconds=60), "--seeds", "1,2", "--lanes", "2", "--gpus", "2",
                       "--timeout", "3")
    assert result.returncode == 1 and "2 run(s) failed" in result.stderr, result.stdout[-2000:]
    assert result.stdout.count("stopped: over --timeout 3 s") == 2 and time.monotonic() - begin < 40


@pytest.mark.slow
def test_ctrl_c_stops_every_lane_and_leaves_no_process(tmp_path):
    out = tmp_path / "lanes"
    sweep_run = subprocess.Popen(sweep_command(out, standin(tmp_path, seconds=120), *SEEDS, "--lanes", "2",
                                               "--gpus", "2"), env=lanes_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    started = [out / "runs" / run / "started.json" for run in SEED_RUNS[:2]]
    deadline = time.monotonic() + 60
    while not all(p.is_file() for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    sweep_run.send_signal(signal.SIGINT)
    stdout, stderr = sweep_run.communicate(timeout=60)
    assert sweep_run.returncode == 130 and "interrupted; run the same command again" in stderr, stdout + stderr
    for path in started:
        with pytest.raises(ProcessLookupError):
            os.kill(json.loads(path.read_text())["pid"], 0)
    assert not (out / "runs" / SEED_RUNS[2]).exists()  # no new run started after Ctrl-C


def assert_resumed(out: Path, run: str, first: dict) -> None:
    """Continued in its own folder with RESUME=<that folder>: its log and first start are kept, appended to."""
    folder = out / "runs" / run
    assert seen(out, run, "resumed.json")["RESUME"] == str(folder.resolve())
    assert seen(out, run, "started.json") == first
    log = (folder / f"{run}.txt").read_text()
    assert log.count("config ") == 1 and log.index("step:2/4 ") < log.index("final_summary ")


@pytest.mark.slow
def test_a_rerun_resumes_a_run_with_a_checkpoint_and_restarts_one_without(tmp_path):
    out, script = tmp_path / "ckpt", standin(tmp_path, seconds=0.2, interrupt_seed=1)
    first = run_lanes(out, script, *SEEDS)
    assert first.returncode == 1 and "1 run(s) failed: base_seed1 " in first.stderr, first.stdout + first.stderr
    assert "FAILED (exit 5; see " in first.stdout and "it has a checkpoint: rerunning the sweep resumes" in first.stdout
    started = seen(out, SEED_RUNS[0], "started.json")
    console = out / "console" / f"{SEED_RUNS[0]}.txt"
    console.write_text("the interrupted part\n")
    log = out / "runs" / SEED_RUNS[2] / f"{SEED_RUNS[2]}.txt"  # interrupted before any checkpoint
    log.write_text(log.read_text().split("final_summary ")[0])
    plan = run_lanes(out, script, *SEEDS, "--dry-run")
    assert "3 runs (1 already finished, 1 to resume)" in plan.stdout
    assert "  resume  base_seed1: " in plan.stdout and "  restart base_seed3: " in plan.stdout
    again = run_lanes(out, script, *SEEDS)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "[1/3] base_seed1: resuming from its checkpoint (step 2)" in again.stdout
    assert f"{SEED_RUNS[2]}: unfinished folder moved" in again.stdout
    assert [p.name[:len(SEED_RUNS[2])] for p in (out / "interrupted").iterdir()] == [SEED_RUNS[2]]
    assert_resumed(out, SEED_RUNS[0], started)
    assert console.read_text().startswith("the interrupted part\n")  # its console output appended to
    assert seen(out, SEED_RUNS[2])["RESUME"] is None  # started over
    table, means = (out / "table.md").read_text().split("\n\n")
    assert [row.split(" | ")[1] for row in table.splitlines()[2:]] == ["1", "2", "3"]
    assert means.splitlines()[2] == "| base | 3 | 1.0200 | 0.0100 |"


@pytest.mark.slow
def test_sigterm_stops_every_lane_with_a_checkpoint_and_a_rerun_resumes_them(tmp_path):
    """Under torchrun (whose ranks have their own sessions): SIGTERM to the sweep reaches every rank, which
    checkpoints and exits; the same command then continues both runs and starts the third."""
    out, args = tmp_path / "term", (*SEEDS, "--nproc", "1", "--lanes", "2", "--gpus", "2")
    sweep_run = subprocess.Popen(sweep_command(out, standin(tmp_path, seconds=120), *args), env=lanes_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = [out / "runs" / run / "started.json" for run in SEED_RUNS[:2]]
    deadline = time.monotonic() + 60
    while not all(p.is_file() for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    firsts = [json.loads(p.read_text()) for p in started]
    sweep_run.send_signal(signal.SIGTERM)
    stdout, stderr = sweep_run.communicate(timeout=150)  # generous: a loaded CI machine
    assert sweep_run.returncode == 143 and "terminated; run the same command again" in stderr, stdout + stderr
    for first in firsts:
        with pytest.raises(ProcessLookupError):
            os.kill(first["pid"], 0)
    assert all((p.parent / "checkpoint" / "checkpoint.json").is_file() for p in started)
    assert not (out / "runs" / SEED_RUNS[2]).exists() and not (out / "table.md").exists()
    again = run_lanes(out, standin(tmp_path, seconds=0.2), *args)  # the same script, now quick
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count("resuming from its checkpoint (step 2)") == 2 and not (out / "interrupted").exists()
    for run, first in zip(SEED_RUNS, firsts):
        assert_resumed(out, run, first)
    assert [row.split(" | ")[1] for row in (out / "table.md").read_text().splitlines()[2:5]] == ["1", "2", "3"]


def test_lanes_share_out_gpus_or_refuse_in_one_line(tmp_path, monkeypatch, capsys):
    def lanes(*argv):
        return sweep.plan_lanes(sweep.parse_args(["--out", str(tmp_path / "o"), *argv]))

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert lanes() == [None]  # one at a time: the environment as it is, torchrun picks its port
    assert "--standalone" in sweep.launch_command(sweep.parse_args(["--out", "o", "--nproc", "2"]))
    pairs = lanes("--lanes", "2", "--nproc", "2", "--gpus", "4,5,6,7")
    assert [(lane.gpus, lane.port) for lane in pairs] == [(["4", "5"], 29504), (["6", "7"], 29506)]
    threads = str(max(1, sweep.cpu_cores() // 4))
    assert pairs[1].env == {"CUDA_VISIBLE_DEVICES": "6,7", "OMP_NUM_THREADS": threads}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1,2")  # the GPUs this shell may use
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert [lane.env for lane in lanes("--lanes", "3")] == [{"CUDA_VISIBLE_DEVICES": g} for g in "312"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake = tmp_path / "bin" / "nvidia-smi"  # the GPU lines count, MIG lines not
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho '  MIG 1g (UUID: b)'\necho 'GPU 1: H1 (UUID: c)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert [lane.gpus for lane in lanes("--lanes", "2")] == [["0"], ["1"]]
    with pytest.raises(sweep.UsageError, match=r"^--lanes 3 x 1 GPU\(s\) a run needs 3 GPUs; nvidia-smi -L gives 2 "
                                                r"\(0,1\)$"):
        lanes("--lanes", "3")
    assert sweep.main(["--out", str(tmp_path / "o"), "--lanes", "2", "--nproc", "2", "--gpus", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --lanes 2 x 2 GPU(s) a run needs 4 GPUs; --gpus gives 3 (0,1,2)\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_a_timeout_that_cannot_mean_anything_is_refused_in_one_line(capsys, value):
    """A threading.Timer of a negative or nan delay fires at once: every run would be stopped as it starts; one of
    inf raises OverflowError in the timer's thread."""
    with pytest.raises(SystemExit) as stop:
        sweep.parse_args(["--out", "s", "--grid", "SEED=1,2", "--timeout", value])
    line = f"error: --timeout {value}: must be a finite number >= 0 (0: no limit)"
    assert stop.value.code == 2 and line in capsys.readouterr().err
    assert sweep.parse_args(["--out", "s", "--grid", "SEED=1,2", "--timeout", "0"]).timeout == 0


def test_unusable_out_seeds_and_list_are_refused_in_one_line(tmp_path, capsys):
    """--out on a file (mkdir's FileExistsError after the plan was printed), an empty --seeds (taken for no seeds) and
    a --list file that is not UTF-8 text (UnicodeDecodeError): one error line each, exit 2, nothing written."""
    (tmp_path / "file").write_text("keep")
    (tmp_path / "binary.txt").write_bytes(b"\xb0\xff NUM_LAYERS=2\n")
    for argv, line in ((["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'}: {tmp_path / 'file'} is a file"),
                       (["--out", str(tmp_path / "file" / "sub")], f"{tmp_path / 'file'} is a file, not a folder"),
                       (["--out", str(tmp_path / "o"), "--seeds", ""], "error: --seeds '': expected comma-separated "
                                                                        "integers")):
        with pytest.raises(SystemExit) as stop:
            sweep.parse_args([*argv, "--no-plots"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and line in err.splitlines()[-1], err
    assert sweep.main(["--out", str(tmp_path / "o"), "--list", str(tmp_path / "binary.txt"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --list {tmp_path / 'binary.txt'}: cannot read it as text (") and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "keep" and not (tmp_path / "o").exists()
