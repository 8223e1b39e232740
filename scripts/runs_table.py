"""Tabulate finished runs from their logs' final_summary lines.

Usage: python scripts/runs_table.py runs/*/            (folders or log files)
Prints one row per run: steps, ms/step, tokens/s, peak memory, pre-export and final val_bpb, bytes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def read_run(path: Path) -> dict | None:
    logs = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    for log in logs:
        text = log.read_text(encoding="utf-8", errors="replace")
        summary = re.findall(r"^final_summary (\{.*\})$", text, re.M)
        if not summary:
            continue
        row = json.loads(summary[-1])
        pre = re.findall(r"^step:\d+/\d+ val_loss:[\d.]+ val_bpb:([\d.]+)", text, re.M)
        row["pre_export_bpb"] = float(pre[-1]) if pre else float("nan")
        row["name"] = path.name if path.is_dir() else log.stem
        return row
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    rows = [r for r in (read_run(p) for p in args.paths) if r]
    if not rows:
        sys.exit("error: no finished run (no final_summary line) in the given paths")
    print("| run | steps | ms/step | tok/s | peak MiB | warmup s | pre-export bpb | final bpb | bytes total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["train_time_ms"] / max(r["steps"], 1)
        tokens = r.get("train_tokens", 0) / max(r["train_time_ms"] / 1000, 1e-9)
        print(f"| {r['name']} | {r['steps']} | {ms:.1f} | {tokens / 1e6:.3f}M | {r['peak_memory_mib']} | "
              f"{r['warmup_time_s']} | {r['pre_export_bpb']:.4f} | {r['val_bpb']:.4f} | {r['bytes_total']} |")


if __name__ == "__main__":
    main()
