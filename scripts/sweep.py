"""Run a grid or list of settings x seeds one after another (or N at once), resumably; end with a table and plots.

Usage:
    python3 scripts/sweep.py --out sweeps/lr --grid "MATRIX_LR=0.02,0.03" --grid "WARMDOWN_FRAC=0.6,0.72" \\
        --seeds 1,2 [--set MAX_WALLCLOCK_SECONDS=300] [--nproc 8] [--dry-run]
    python3 scripts/sweep.py --out sweeps/shapes --list shapes.txt --seeds 1,2,3
    python3 scripts/sweep.py --out sweeps/abl --list ablations.txt --lanes 4 [--gpus 4,5,6,7] \\
        --set MAX_WALLCLOCK_SECONDS=150 --set TRAIN_ONLY=1

Settings: the product of every --grid (values separated by ',', or by '|' when a value holds
commas, e.g. "PROG_DEPTH=0.4:2,1.0:3|0.5:2,1.0:3") with every line of --list FILE (one setting a
line: `[label:] VAR=VALUE VAR=VALUE ...`, `#` comments). --set VAR=VALUE applies to every run, on top
of the environment. Each setting runs once per --seeds value (SEED unset without --seeds).

Each run is train_gpt.py (--script) launched as plain python (--nproc 0, the default: one process,
one GPU or the CPU) or under torchrun with N processes, with OUT_DIR=<out>/runs/<run id>; its
console output goes to <out>/console/<run id>.txt. Every run's settings are checked with
train_gpt.build_config before anything starts. Rerunning the same command resumes: a run whose log
has its final_summary is not run again (it must have the same settings); an unfinished run whose
folder holds a complete checkpoint (checkpoint/checkpoint.json, which train_gpt.py writes when stopped
by SIGTERM/SIGINT, or every CHECKPOINT_EVERY seconds) continues from it with RESUME=<its folder> and the
same settings, its console output appended; any other unfinished run folder is moved to
<out>/interrupted/ and the run starts over. The end: <out>/table.md (runs sorted by score, then the
mean per setting) and, with matplotlib, train_loss.png (train loss against tokens), val_bpb.png (each
run's score by setting) and schedule_<best run>.png (its LR multiplier and core passes, computed by
train_gpt's own schedule functions).

--lanes N (default 1: one run at a time) runs up to N side by side on one host; a free lane takes the
next pending run, a failed run stops nothing else. Lane i gets the next max(--nproc, 1) GPUs as
CUDA_VISIBLE_DEVICES (from --gpus, else the environment's CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`;
refused when too few), under torchrun its own --master_port (29500 + its first GPU's number), and
OMP_NUM_THREADS = the CPU cores // (N x max(--nproc, 1)) unless it is set already: runs that each use
every core slow each other down. Console lines then start with the run id.

Ctrl-C or SIGTERM to the sweep (say, its machine is pre-empted) sends SIGTERM to every run under way
(a second one kills them) and starts no other: a run in training writes a checkpoint and exits 5, and
the same command, run again, resumes it.

Exit status: 0 all runs finished, 1 a run failed, 2 bad arguments or settings, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
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
MASTER_PORT = 29500  # torchrun's default; a lane's runs use this + the number of its first GPU
PROGRESS = re.compile(r"^(step:\d+/\S+ (train|val)_loss|stopping_early|final_\S+ val_loss:\S+ val_bpb:\S+ eval_time"
                      r"|error|WARNING)")  # the lines a run's progress is shown by


class UsageError(Exception):
    """Bad arguments or settings: one `error:` line, exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM to the sweep: its runs are stopped as on Ctrl-C, then exit 143."""


def on_sigterm(number: int, frame) -> None:
    raise Terminated()


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


@dataclasses.dataclass
class Lane:
    """One of --lanes N > 1: the GPUs its runs get, their torchrun port and what it adds to their environment."""
    index: int
    gpus: list[str]
    port: int | None  # torchrun --master_port; None for plain python (--nproc 0)
    env: dict  # CUDA_VISIBLE_DEVICES, and OMP_NUM_THREADS unless the environment sets it


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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--list {path}: cannot read it as text ({exc})") from None
    settings = []
    for number, line in enumerate(text.splitlines(), 1):
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
    """'done' (finished with these settings), 'resume' (unfinished, with a checkpoint), 'restart' (an
    unfinished folder without one) or 'new'."""
    expected = expected_config(run, nproc)
    if not run.folder.exists() or not any(run.folder.iterdir()):
        return "new"
    try:
        log = read_log(run.folder)
    except LogError:
        log = None
    if log is None or not log.finished:
        return "restart" if resume_env(run.folder) is None else "resume"
    differ = [k for k in expected if k not in ("run_id", "out_dir") and log.config.get(k) != expected[k]]
    if differ:
        k = differ[0]
        raise UsageError(f"{run.folder}: finished with other settings ({k.upper()}: {log.config.get(k)!r} in its "
                         f"log, {expected[k]!r} now); remove it or use another --out")
    return "done"


# ---------------------------------------------------------------------------------------------
# Lanes: which GPUs, port and threads each of --lanes N gets
# ---------------------------------------------------------------------------------------------


def gpu_numbers(text: str) -> list[str]:
    """--gpus: '4' -> 0..3 (a count); '4,5,6,7' -> those devices."""
    if re.fullmatch(r"\d+", text.strip()):
        return [str(i) for i in range(int(text))]
    ids = [g.strip() for g in text.split(",")]
    if not all(re.fullmatch(r"\d+", g) for g in ids) or len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {text}: expected a count or distinct GPU numbers separated by ','")
    return ids


def available_gpus(args, needed: int) -> tuple[list[str], str]:
    """The GPUs to share out and where they were found: --gpus, else CUDA_VISIBLE_DEVICES, else
    `nvidia-smi -L`, else (no nvidia-smi) as many as the lanes need."""
    if args.gpus is not None:
        return gpu_numbers(args.gpus), "--gpus"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [g.strip() for g in visible.split(",")], "CUDA_VISIBLE_DEVICES"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [str(i) for i in range(needed)], "no nvidia-smi: assumed"
    return [str(i) for i in range(sum(line.startswith("GPU ") for line in listed.splitlines()))], "nvidia-smi -L"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_lanes(args) -> list[Lane | None]:
    """[None] for --lanes 1 (runs get the environment as it is); else lane i gets the i-th group of
    max(nproc, 1) GPUs, its own torchrun port and an even share of the cores (UsageError when too few GPUs)."""
    if args.lanes == 1:
        return [None]
    per = max(args.nproc, 1)
    gpus, source = available_gpus(args, args.lanes * per)
    if args.lanes * per > len(gpus):
        raise UsageError(f"--lanes {args.lanes} x {per} GPU(s) a run needs {args.lanes * per} GPUs; {source} gives "
                         f"{len(gpus)} ({','.join(gpus) or 'none'})")
    if args.nproc and not all(g.isdigit() for g in gpus):
        raise UsageError(f"{source}={','.join(gpus)}: torchrun lanes need GPU numbers (their ports follow from them)")
    threads = max(1, cpu_cores() // (args.lanes * per))
    threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(threads)}
    lanes = []
    for i in range(args.lanes):
        own = gpus[i * per:(i + 1) * per]
        lanes.append(Lane(i, own, MASTER_PORT + int(own[0]) if args.nproc else None,
                          {"CUDA_VISIBLE_DEVICES": ",".join(own), **threads}))
    return lanes


def describe(lane: Lane) -> str:
    return " ".join([f"lane {lane.index}:", *(f"{k}={v}" for k, v in lane.env.items()),
                     *([f"--master_port={lane.port}"] if lane.port else [])])


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def resume_env(folder: Path) -> dict | None:
    """How to continue an unfinished run in `folder`: RESUME=<folder> when train_gpt.py left a complete
    checkpoint there (checkpoint.json names one only once every rank's file is whole), else None."""
    return {"RESUME": str(folder)} if (folder / "checkpoint" / "checkpoint.json").is_file() else None


def launch_command(args, lane: Lane | None = None) -> list[str]:
    script = str(args.script)
    if args.nproc:  # --standalone picks a free port itself; a lane names its own
        where = [f"--master_port={lane.port}"] if lane else ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={args.nproc}", script]
    return [sys.executable, script]


PRINT = threading.Lock()


def say(text: str) -> None:
    """One line on the console, whole even while several lanes print."""
    with PRINT:
        print(text, flush=True)


def signal_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it has ended already
        pass


class Running:
    """The runs under way (each its own process group); stop() ends them and keeps new ones from starting."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopped = False

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.add(proc)
            stopped = self.stopped
        if stopped:
            signal_group(proc)

    def remove(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        with self.lock:
            self.stopped = True
            procs = list(self.procs)
        for proc in procs:
            signal_group(proc, sig)


def run_one(run: Run, args, extra_env: dict, lane: Lane | None, running: Running) -> bool:
    """Launch one run, stream its progress lines, keep its console output; True when it finished."""
    console = args.out / "console" / f"{run.run_id}.txt"
    console.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(lane.env if lane else {}), **run.env, **extra_env, "PYTHONUNBUFFERED": "1"}
    tag = f"  {run.run_id}: " if lane else "  "  # lanes print side by side
    start = time.monotonic()
    with open(console, "a" if "RESUME" in extra_env else "w", encoding="utf-8") as out:
        proc = subprocess.Popen(launch_command(args, lane), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # its own group: stopped as a whole
        running.add(proc)
        timer = threading.Timer(args.timeout, signal_group, (proc,)) if args.timeout else None
        try:
            if timer:
                timer.start()
            for line in proc.stdout:
                out.write(line)
                if PROGRESS.match(line):
                    say(f"{tag}{line.rstrip()}")
            proc.wait()
        except BaseException:
            signal_group(proc)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
            running.remove(proc)
    if running.stopped:  # Ctrl-C: the sweep says so once
        return False
    if args.timeout and time.monotonic() - start >= args.timeout:
        say(f"{tag}stopped: over --timeout {args.timeout:g} s")
    try:
        finished = read_log(run.folder).finished
    except LogError:
        finished = False
    took = time.monotonic() - start
    how = "finished" if finished else f"FAILED (exit {proc.returncode}; see {console})"
    if not finished and resume_env(run.folder):
        how += f"; it has a checkpoint: rerunning the sweep resumes it (to start over, remove {run.folder})"
    say(f"{tag}{how} in {took:.0f} s")
    return finished


def prepare(number: str, run: Run, state: str, args) -> dict | None:
    """Before a run: None when it finished already, else what it adds to the environment (RESUME for
    an unfinished folder with a checkpoint; one without is moved aside)."""
    if state == "done":
        say(f"{number} {run.run_id}: already finished")
        return None
    if state == "resume":
        manifest = json.loads((run.folder / "checkpoint" / "checkpoint.json").read_text(encoding="utf-8"))
        say(f"{number} {run.run_id}: resuming from its checkpoint (step {manifest.get('step', '?')})")
        return resume_env(run.folder)
    if state == "restart":
        aside = args.out / "interrupted" / f"{run.run_id}-{time.strftime('%Y%m%d_%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        run.folder.rename(aside)
        say(f"{number} {run.run_id}: unfinished folder moved to {aside}; starting over")
    return {}


def wait_for(ended: list[threading.Event]) -> None:
    """Until every lane has ended. Polled with sleep: a join interrupted by Ctrl-C can leave a running
    thread looking ended (Python 3.11), and then its run would be left behind."""
    while not all(e.is_set() for e in ended):
        time.sleep(0.1)


def execute(runs: list[Run], states: list[str], args, lanes: list[Lane | None]) -> list[str]:
    """Run what is not done, in order, one per lane at a time; the run ids that failed. Ctrl-C (or
    SIGTERM, raised as Terminated) stops every run under way (a second one kills them) and raises it
    again once they have ended."""
    pending = list(enumerate(zip(runs, states), 1))
    failed, lock, running = set(), threading.Lock(), Running()

    def lane_loop(lane: Lane | None, ended: threading.Event) -> None:
        try:
            take_runs(lane)
        finally:
            ended.set()

    def take_runs(lane: Lane | None) -> None:
        while True:
            with lock:  # takes the next pending run
                if running.stopped or not pending:
                    return
                i, (run, state) = pending.pop(0)
                extra = prepare(f"[{i}/{len(runs)}]", run, state, args)
            if extra is None:
                continue
            say(f"[{i}/{len(runs)}] {run.run_id}: running {run.label}" + (f" ({describe(lane)})" if lane else ""))
            try:
                ok = run_one(run, args, extra, lane, running)
            except Exception as exc:  # e.g. it could not be launched: the other lanes go on
                say(f"  {run.run_id}: FAILED ({type(exc).__name__}: {exc})")
                ok = False
            if not ok:
                with lock:
                    failed.add(run.run_id)

    ended = [threading.Event() for _ in lanes]
    threads = [threading.Thread(target=lane_loop, args=lane_end, daemon=True) for lane_end in zip(lanes, ended)]
    try:
        for thread in threads:
            thread.start()
        wait_for(ended)
    except KeyboardInterrupt:
        running.stop()
        for thread, end in zip(threads, ended):
            if thread.ident is None:  # not started: nothing to wait for
                end.set()
        try:
            wait_for(ended)
        except KeyboardInterrupt:
            running.stop(signal.SIGKILL)
            wait_for(ended)
        raise
    return [run.run_id for run in runs if run.run_id in failed]


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
    lr, passes = [], []
    for step in range(steps + 1):
        t = tg.run_fraction(cfg, step, elapsed_ms[step] / 1000)
        lr.append(tg.lr_multiplier(cfg, t))
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
    p.add_argument("--lanes", type=int, default=1, metavar="N",
                   help="up to N runs at once, each on its own max(--nproc, 1) GPUs (default: 1, one after another)")
    p.add_argument("--gpus", metavar="N|I,J,..", help="with --lanes: the GPUs to share out, a count (4: GPUs 0-3) or "
                   "GPU numbers (4,5,6,7); default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L's")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state, run nothing")
    p.add_argument("--no-plots", action="store_true", help="the table only (no matplotlib needed)")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds is not None else []
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.nproc < 0:
        p.error(f"--nproc {args.nproc}: must be >= 0")
    if args.lanes < 1:
        p.error(f"--lanes {args.lanes}: must be >= 1")
    if not 0 <= args.timeout < math.inf:  # nan stopped every run as it started; inf crashed the timer thread
        p.error(f"--timeout {args.timeout:g}: must be a finite number >= 0 (0: no limit)")
    if args.gpus is not None and args.lanes == 1:
        p.error("--gpus goes with --lanes N > 1 (for one run at a time, set CUDA_VISIBLE_DEVICES)")
    if not args.script.is_file():
        p.error(f"--script {args.script}: file not found")
    nearest = next(q for q in (args.out.absolute(), *args.out.absolute().parents) if q.exists())
    if not nearest.is_dir():
        p.error(f"--out {args.out}: {nearest} is a file, not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = plan_runs(args)
        states = [status(run, args.nproc) for run in runs]
        lanes = plan_lanes(args)
        if not args.no_plots and not args.dry_run:
            try:
                pyplot()
            except ImportError:
                raise UsageError("the plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launcher = " ".join(launch_command(args, lanes[0]))
    at_once = f", {len(lanes)} at a time" if len(lanes) > 1 else ""
    resuming = f", {states.count('resume')} to resume" if "resume" in states else ""
    print(f"{len(runs)} runs ({states.count('done')} already finished{resuming}){at_once}, each: {launcher}")
    if len(lanes) > 1:
        print("\n".join(f"  {describe(lane)}" for lane in lanes))
    for run, state in zip(runs, states):
        print(f"  {state:7} {run.run_id}: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items()))
    if args.dry_run:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    plan = dict(command=sys.argv, launcher=launcher, runs=[dataclasses.asdict(r) | {"folder": str(r.folder)}
                                                           for r in runs])
    if len(lanes) > 1:
        plan["lanes"] = [dataclasses.asdict(lane) for lane in lanes]
    (args.out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, on_sigterm)  # a pre-empted machine's notice: stop the runs as on Ctrl-C
        failed = execute(runs, states, args, lanes)
    except KeyboardInterrupt as exc:
        print(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; run the same command again to "
              "resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(runs, args)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see {args.out / 'console'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
