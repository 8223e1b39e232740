"""scripts/sweep.py: a grid of two tiny CPU runs, resumed (a finished run is not run again, an
unfinished one is moved aside and run again), its table and plots, and the schedules it draws."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_environ, tiny_env

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402
from runlog import read_log  # noqa: E402

GRID = ("--grid", "MATRIX_LR=0.02,0.05", "--seeds", "1", "--set", "NUM_UNIQUE_LAYERS=1", "--set",
        "PROG_DEPTH=0.5:1,1.0:2")  # one shared block: 1 pass for the first half, then 2
RUNS = ("matrix_lr0.02_seed1", "matrix_lr0.05_seed1")


def run_sweep(data: Path, out: Path, *args) -> subprocess.CompletedProcess:
    env = {**clean_environ(), **tiny_env(data, ITERATIONS=8, TRAIN_LOG_EVERY=2, EVAL_STRIDE=32)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "lr"
    result = run_sweep(tiny_data, out, *GRID)
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
def test_finished_runs_are_not_rerun_and_unfinished_ones_restart(swept, tiny_data):
    out, _ = swept
    finished = log_of(out, RUNS[0]).read_bytes()
    before = log_of(out, RUNS[0]).stat().st_mtime_ns
    again = run_sweep(tiny_data, out, *GRID)
    assert again.returncode == 0 and again.stdout.count(": already finished") == 2, again.stdout[-2000:]
    assert "running" not in again.stdout and log_of(out, RUNS[0]).stat().st_mtime_ns == before
    # an interrupted run: its log stops before the final_summary line
    text = log_of(out, RUNS[1]).read_text()
    log_of(out, RUNS[1]).write_text(text[:text.index("\nfinal_summary ")])
    resumed = run_sweep(tiny_data, out, *GRID)
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
