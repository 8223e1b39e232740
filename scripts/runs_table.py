"""Tabulate finished runs from their logs (scripts/runlog.py reads them).

Usage: python scripts/runs_table.py runs/*/            (run folders or log files)
Prints a markdown table, best score first: steps, ms/step, tokens/s, peak memory, warmup, the
pre-export val_bpb, the val_bpb of each final evaluation (round trip, sliding, TTT) and the bytes.
EVAL_ONLY runs have no training columns ("-"). Unfinished runs are listed on stderr and left out.
sweep.py builds its table with the same functions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from runlog import LogError, RunLog, read_log

Column = tuple[str, Callable[[RunLog], object]]
DASH = "-"


def number(value, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def tokens_per_s(run: RunLog) -> str:
    s = run.summary
    if not s.get("train_tokens") or not s.get("train_time_ms"):
        return DASH
    return f"{s['train_tokens'] / (s['train_time_ms'] / 1000) / 1e6:.3f}M"


COLUMNS: dict[str, Callable[[RunLog], object]] = {
    "run": lambda r: r.name,
    "seed": lambda r: r.seed,
    "steps": lambda r: number(r.steps, "d"),
    "ms/step": lambda r: number(r.step_avg_ms, ".1f"),
    "tok/s": tokens_per_s,
    "peak MiB": lambda r: r.summary.get("peak_memory_mib", DASH),
    "warmup s": lambda r: r.summary.get("warmup_time_s", DASH),
    "pre-export bpb": lambda r: number(r.val[-1][2] if r.val else None, ".4f"),
    "bytes total": lambda r: r.summary["bytes_total"],
}
DEFAULT = ("run", "steps", "ms/step", "tok/s", "peak MiB", "warmup s", "pre-export bpb")


def eval_columns(runs: list[RunLog]) -> list[Column]:
    """One column per kind of final evaluation found in any run, in the order the script runs them."""
    kinds: list[str] = []
    for run in runs:
        kinds += [k for k in run.evals_by_kind() if k not in kinds]
    return [(f"{k} bpb", lambda r, k=k: number(r.evals_by_kind().get(k, {}).get("val_bpb"), ".4f")) for k in kinds]


def columns(runs: list[RunLog], names=DEFAULT, extra: list[Column] = ()) -> list[Column]:
    """`extra` (e.g. sweep's setting), the named columns, each evaluation's bpb, then the bytes."""
    return [*extra, *((n, COLUMNS[n]) for n in names), *eval_columns(runs), ("bytes total", COLUMNS["bytes total"])]


def markdown(runs: list[RunLog], cols: list[Column]) -> str:
    """Finished runs as a markdown table, best final val_bpb first."""
    runs = sorted(runs, key=lambda r: r.summary["val_bpb"])
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(f(r)) for _, f in cols) + " |" for r in runs]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders (runs/<RUN_ID>/) or their log files")
    args = parser.parse_args()
    runs = []
    for path in args.paths:
        try:
            run = read_log(path)
        except LogError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        if run.finished:
            runs.append(run)
        else:
            print(f"skipped: {run.path}: not finished (no final_summary line)", file=sys.stderr)
    if not runs:
        print("error: no finished run (no final_summary line) in the given paths", file=sys.stderr)
        sys.exit(2)
    print(markdown(runs, columns(runs)))


if __name__ == "__main__":
    main()
