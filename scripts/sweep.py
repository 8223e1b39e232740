"""Run a grid or list of settings x seeds one after another, resumably; end with a table and plots.

Usage:
    python3 scripts/sweep.py --out sweeps/lr --grid "MATRIX_LR=0.02,0.03" --grid "WARMDOWN_FRAC=0.6,0.72" \\
        --seeds 1,2 [--set MAX_WALLCLOCK_SECONDS=300] [--nproc 8] [--dry-run]
    python3 scripts/sweep.py --out sweeps/shapes --list shapes.txt --seeds 1,2,3

Settings: the product of every --grid (values separated by ',', or by '|' when a value holds
commas, e.g. "PROG_DEPTH=0.4:2,1.0:3|0.5:2,1.0:3") with every line of --list FILE (one setting a
line: `[label:] VAR=VALUE VAR=VALUE ...`, `#` comments). --set VAR=VALUE applies to every run, on top
of the environment. Each setting runs once per --seeds value (SEED unset without --seeds).

Each run is train_gpt.py (--script) launched as plain python (--nproc 0, the default: one process,
one GPU or the CPU) or under torchrun with N processes, with OUT_DIR=<out>/runs/<run id>; its
console output goes to <out>/console/<run id>.txt. Every run's settings are checked with
train_gpt.build_config before anything starts. Rerunning the same command resumes: a run whose log
has its final_summary is not run again (it must have the same settings), an unfinished run folder
is moved to <out>/interrupted/ and the run starts over (see resume_env). The end: <out>/table.md
(runs sorted by score, then the mean per setting) and, with matplotlib, train_loss.png (train loss
against tokens), val_bpb.png (each run's score by setting) and schedule_<best run>.png (its LR
multiplier and core passes, computed by train_gpt's own schedule functions).
Exit status: 0 all runs finished, 1 a run failed, 2 bad arguments or settings, 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import runs_table
from runlog import LogError, RunLog, env_text, read_log

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^(step:\d+/\S+ (train|val)_loss|stopping_early|final_\S+ val_loss:\S+ val_bpb:\S+ eval_time"
                      r"|error|WARNING)")  # the lines a run's progress is shown by


class UsageError(Exception):
    """Bad arguments or settings: one `error:` line, exit 2."""


def train_gpt():
    """The repository's train_gpt.py, imported (importing it does nothing but define things)."""
    sys.path.insert(0, str(ROOT))
    import train_gpt as module

    return module


@dataclasses.dataclass
class Run:
    run_id: str
    label: str  # the setting, as the table shows it
    env: dict  # what this run adds to the environment: setting, SEED, RUN_ID, OUT_DIR
    folder: Path


# ---------------------------------------------------------------------------------------------
# The plan: settings x seeds, each checked by build_config
# ---------------------------------------------------------------------------------------------


def parse_assignment(text: str, where: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name.strip()):
        raise UsageError(f"{where}: {text!r} is not VAR=VALUE")
    return name.strip(), value.strip()


def grid_settings(grids: list[str]) -> list[dict]:
    axes = []
    for spec in grids:
        name, values = parse_assignment(spec, "--grid")
        items = [v.strip() for v in values.split("|" if "|" in values else ",")]
        if not all(items):
            raise UsageError(f"--grid {spec!r}: an empty value")
        axes.append([(name, v) for v in items])
    return [dict(combo) for combo in itertools.product(*axes)]


def list_settings(path: Path) -> list[tuple[str | None, dict]]:
    if not path.is_file():
        raise UsageError(f"--list {path}: file not found")
    settings = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        label, sep, rest = line.partition(":")
        if not sep or "=" in label:
            label, rest = None, line
        where = f"{path}:{number}"
        try:
            settings.append((label and label.strip(), dict(parse_assignment(t, where) for t in shlex.split(rest))))
        except ValueError as exc:  # unbalanced quotes
            raise UsageError(f"{where}: {exc}") from None
    if not settings:
        raise UsageError(f"--list {path}: no settings in it")
    return settings


def slug(setting: dict) -> str:
    text = "_".join(f"{k.lower()}{re.sub(r'[^A-Za-z0-9.+-]+', '-', v)}" for k, v in setting.items()) or "base"
    return text[:80]


def plan_runs(args) -> list[Run]:
    listed = list_settings(args.list) if args.list else [(None, {})]
    grid = grid_settings(args.grid)
    common = dict(parse_assignment(s, "--set") for s in args.set)
    runs, seen = [], set()
    for (label, base), extra in itertools.product(listed, grid):
        setting = {**base, **extra}
        shown = " ".join(f"{k}={v}" for k, v in (extra if label else setting).items())
        name = "_".join(filter(None, [label, slug(extra) if label and extra else ""])) or slug(setting)
        shown = " ".join(filter(None, [label, shown])) or "base"
        for seed in args.seeds or [None]:
            run_id = name + (f"_seed{seed}" if seed is not None else "")
            while run_id in seen:
                run_id += "_"
            seen.add(run_id)
            folder = (args.out / "runs" / run_id).resolve()
            env = {**common, **setting, **({"SEED": str(seed)} if seed is not None else {}),
                   "RUN_ID": run_id, "OUT_DIR": str(folder)}
            runs.append(Run(run_id, shown, env, folder))
    return runs


def expected_config(run: Run, nproc: int) -> dict:
    """The configuration train_gpt.py will log for this run (UsageError naming the run when invalid)."""
    tg = train_gpt()
    try:
        cfg = tg.build_config({**os.environ, **run.env}, max(nproc, 1))
    except tg.ConfigError as exc:
        raise UsageError(f"run {run.run_id}: {exc}") from None
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def status(run: Run, nproc: int) -> str:
    """'done' (finished with these settings), 'restart' (an unfinished folder) or 'new'."""
    expected = expected_config(run, nproc)
    if not run.folder.exists() or not any(run.folder.iterdir()):
        return "new"
    try:
        log = read_log(run.folder)
    except LogError:
        return "restart"
    if not log.finished:
        return "restart"
    differ = [k for k in expected if k not in ("run_id", "out_dir") and log.config.get(k) != expected[k]]
    if differ:
        k = differ[0]
        raise UsageError(f"{run.folder}: finished with other settings ({k.upper()}: {log.config.get(k)!r} in its "
                         f"log, {expected[k]!r} now); remove it or use another --out")
    return "done"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def resume_env(folder: Path) -> dict | None:
    """How to continue an unfinished run in `folder`. train_gpt.py cannot resume yet, so None: the
    folder is moved aside and the run starts over. Once it can (say RESUME=<checkpoint>), return
    {"RESUME": str(checkpoint)} here and run() keeps the folder."""
    return None


def launch_command(args) -> list[str]:
    script = str(args.script)
    if args.nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", script]
    return [sys.executable, script]


def run_one(run: Run, args, extra_env: dict) -> bool:
    """Launch one run, stream its progress lines, keep its console output; True when it finished."""
    console = args.out / "console" / f"{run.run_id}.txt"
    console.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **run.env, **extra_env, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(console, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(launch_command(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # its own group: stopped as a whole
        stop = lambda: os.killpg(proc.pid, signal.SIGTERM)  # noqa: E731
        timer = threading.Timer(args.timeout, stop) if args.timeout else None
        try:
            if timer:
                timer.start()
            for line in proc.stdout:
                out.write(line)
                if PROGRESS.match(line):
                    print(f"  {line.rstrip()}", flush=True)
            proc.wait()
        except KeyboardInterrupt:
            stop()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    if args.timeout and time.monotonic() - start >= args.timeout:
        print(f"  stopped: over --timeout {args.timeout:g} s", flush=True)
    try:
        finished = read_log(run.folder).finished
    except LogError:
        finished = False
    took = time.monotonic() - start
    print(f"  {'finished' if finished else f'FAILED (exit {proc.returncode}; see {console})'} in {took:.0f} s",
          flush=True)
    return finished


def execute(runs: list[Run], states: list[str], args) -> list[str]:
    """Run what is not done, in order; the run ids that failed."""
    failed = []
    for i, (run, state) in enumerate(zip(runs, states), 1):
        if state == "done":
            print(f"[{i}/{len(runs)}] {run.run_id}: already finished", flush=True)
            continue
        extra = {}
        if state == "restart":
            extra = resume_env(run.folder)
            if extra is None:
                aside = args.out / "interrupted" / f"{run.run_id}-{time.strftime('%Y%m%d_%H%M%S')}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                run.folder.rename(aside)
                print(f"[{i}/{len(runs)}] {run.run_id}: unfinished folder moved to {aside}; starting over", flush=True)
                extra = {}
        print(f"[{i}/{len(runs)}] {run.run_id}: running {run.label}", flush=True)
        if not run_one(run, args, extra):
            failed.append(run.run_id)
    return failed


# ---------------------------------------------------------------------------------------------
# The report: table and plots
# ---------------------------------------------------------------------------------------------


def setting_summary(finished: list[tuple[Run, RunLog]]) -> str:
    by_label: dict[str, list[float]] = {}
    for run, log in finished:
        by_label.setdefault(run.label, []).append(log.summary["val_bpb"])
    rows = ["| setting | seeds | mean val_bpb | std |", "|---|---|---|---|"]
    for label, scores in sorted(by_label.items(), key=lambda kv: statistics.mean(kv[1])):
        std = f"{statistics.stdev(scores):.4f}" if len(scores) > 1 else "-"
        rows.append(f"| {label} | {len(scores)} | {statistics.mean(scores):.4f} | {std} |")
    return "\n".join(rows)


def report_table(finished: list[tuple[Run, RunLog]]) -> str:
    labels = {id(log): run.label for run, log in finished}
    logs = [log for _, log in finished]
    cols = runs_table.columns(logs, names=("seed", "steps", "ms/step"), extra=[("setting", lambda r: labels[id(r)])])
    return runs_table.markdown(logs, cols) + "\n\n" + setting_summary(finished) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_train_loss(finished: list[tuple[Run, RunLog]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, log in finished:
        if log.train:
            tokens = [step * log.config["train_batch_tokens"] for step, _, _ in log.train]
            ax.plot(tokens, [loss for _, loss, _ in log.train], label=run.run_id, linewidth=1)
    ax.set(xlabel="training tokens", ylabel="train loss (nats per token)", title="Train loss")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_val_bpb(finished: list[tuple[Run, RunLog]], path: Path) -> None:
    plt = pyplot()
    by_label: dict[str, list[float]] = {}
    for run, log in finished:
        by_label.setdefault(run.label, []).append(log.summary["val_bpb"])
    order = sorted(by_label, key=lambda k: statistics.mean(by_label[k]), reverse=True)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(order)))
    for y, label in enumerate(order):
        ax.scatter(by_label[label], [y] * len(by_label[label]), color="tab:blue", zorder=3)
        ax.scatter([statistics.mean(by_label[label])], [y], marker="|", s=400, color="black", zorder=2)
    ax.set_yticks(range(len(order)), order, fontsize="small")
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set(xlabel="val_bpb (dots: seeds; bar: mean; lower is better)", title="Final val_bpb per run")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def schedule(log: RunLog) -> tuple[list[int], list[float], list[int]]:
    """Per step: the LR multiplier and core passes train_gpt's schedule functions give this run's
    config, with the elapsed time interpolated from its logged train_time."""
    import numpy as np

    tg = train_gpt()
    knobs = tg.env_knobs()
    cfg = tg.build_config({name: env_text(log.config[f.name]) for name, f in knobs.items() if f.name in log.config},
                          log.config.get("world_size", 1))
    steps = log.steps or cfg.iterations
    points = [(0, 0.0)] + [(step, ms) for step, _, ms in log.train]
    elapsed_ms = np.interp(range(steps + 1), [p[0] for p in points], [p[1] for p in points])
    step_ms = log.step_avg_ms or 0.0
    lr, passes = [], []
    for step in range(steps + 1):
        t = tg.run_fraction(cfg, step, elapsed_ms[step] / 1000)
        lr.append(tg.lr_multiplier(cfg, step, t, step_ms))
        passes.append(tg.depth_phase(cfg, t))
    return list(range(steps + 1)), lr, passes


def plot_schedule(log: RunLog, path: Path) -> None:
    plt = pyplot()
    steps, lr, passes = schedule(log)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    top.plot(steps, lr)
    top.set(ylabel="LR multiplier", title=f"Schedules of {log.name}")
    bottom.step(steps, passes, where="post", color="tab:orange")
    bottom.set(xlabel="step", ylabel="core passes", ylim=(0, max(passes) + 1))
    bottom.yaxis.get_major_locator().set_params(integer=True)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[Run], args) -> None:
    finished = []
    for run in runs:
        try:
            log = read_log(run.folder)
        except LogError:
            continue
        if log.finished:
            finished.append((run, log))
    if not finished:
        print("no finished run to tabulate")
        return
    table = report_table(finished)
    (args.out / "table.md").write_text(table, encoding="utf-8")
    print("\n" + table)
    if args.no_plots:
        return
    best = min(finished, key=lambda rl: rl[1].summary["val_bpb"])[1]
    plots = {"train_loss.png": lambda p: plot_train_loss(finished, p),
             "val_bpb.png": lambda p: plot_val_bpb(finished, p),
             f"schedule_{best.name}.png": lambda p: plot_schedule(best, p)}
    for name, draw in plots.items():
        draw(args.out / name)
    print(f"wrote {args.out / 'table.md'} and " + ", ".join(str(args.out / n) for n in plots))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", type=Path, required=True, help="sweep folder: runs/, console/, table.md, plots")
    p.add_argument("--grid", action="append", default=[], metavar="VAR=V1,V2", help="one axis of the grid (repeatable)")
    p.add_argument("--list", type=Path, metavar="FILE", help="settings, one a line: [label:] VAR=VALUE ...")
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="for every run (repeatable)")
    p.add_argument("--seeds", help="comma-separated seeds, each setting once per seed")
    p.add_argument("--nproc", type=int, default=0, help="processes per run under torchrun; 0 = plain python (default)")
    p.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="script to run (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=0, help="stop a run after this many seconds (default: none)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state, run nothing")
    p.add_argument("--no-plots", action="store_true", help="the table only (no matplotlib needed)")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.nproc < 0:
        p.error(f"--nproc {args.nproc}: must be >= 0")
    if not args.script.is_file():
        p.error(f"--script {args.script}: file not found")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = plan_runs(args)
        states = [status(run, args.nproc) for run in runs]
        if not args.no_plots and not args.dry_run:
            try:
                pyplot()
            except ImportError:
                raise UsageError("the plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launcher = " ".join(launch_command(args))
    print(f"{len(runs)} runs ({sum(s == 'done' for s in states)} already finished), each: {launcher}")
    for run, state in zip(runs, states):
        print(f"  {state:7} {run.run_id}: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items()))
    if args.dry_run:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps(
        dict(command=sys.argv, launcher=launcher, runs=[dataclasses.asdict(r) | {"folder": str(r.folder)}
                                                         for r in runs]), indent=1) + "\n", encoding="utf-8")
    try:
        failed = execute(runs, states, args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    report(runs, args)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see {args.out / 'console'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
