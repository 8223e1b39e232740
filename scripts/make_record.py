"""Build a review-ready records folder from the seed runs of one configuration.

Usage:
    python3 scripts/make_record.py runs/s1 runs/s2 runs/s3 --name SP8192_Loop3 \\
        [--track 10min_16mb|non_record_16mb] [--against PREVIOUS] [--author A --github-id G] \\
        [--blurb TEXT] [--code FILE] [--out FOLDER] [--date YYYY-MM-DD]

Each RUN_DIR is a run folder `runs/<RUN_ID>/` (or its log). The folder written
(default records/track_<track>/<date>_<NAME>/, which must not exist) holds the train_gpt.py the
seeds ran (taken from the logs, where it is embedded byte for byte, or from --code FILE; either
way its SHA-256 must equal every log's code_sha256), each seed's log, submission.json and a
README.md with the results table, the statistics and the exact command.

It refuses, naming the file and the reason, when a log is not a finished run, when the logs ran
different code or different settings (anything but SEED, RUN_ID, DATA_PATH, TOKENIZER_PATH,
OUT_DIR), when a seed's artifact is over 16,000,000 bytes, or (10min track) when training or
evaluation took over 600 s. --against PREVIOUS (a records folder, or comma-separated per-seed
val_bpb) adds the one-sided Welch t-test that reviewers ask for (scripts/welch.py).
Exit status: 0 written, 2 refused or bad arguments (one `error:` line).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import welch
from runlog import PER_RUN_SETTINGS, LogError, RunLog, config_differences, env_text, read_log

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 16_000_000
TIME_LIMIT_S = {"10min_16mb": 600.0, "non_record_16mb": None}  # training and evaluation, each


class Refusal(Exception):
    """The runs cannot make a valid record; the message says which file and why."""


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def run_problems(run: RunLog, track: str) -> list[str]:
    """What disqualifies this one log on its own."""
    if not run.finished:
        return [f"{run.path}: not a finished run (no final_summary line)"]
    if run.eval_only:
        return [f"{run.path}: an EVAL_ONLY run (no training); a record ships the training runs"]
    s, problems = run.summary, []
    if run.code_sha256 is None:
        problems.append(f"{run.path}: no code_sha256 header line (an older train_gpt.py); rerun with this one")
    elif s["bytes_code"] != run.code_bytes:
        problems.append(f"{run.path}: final_summary counts {s['bytes_code']} code bytes, "
                        f"but the code it ran has {run.code_bytes}")
    if s["bytes_total"] != s["bytes_code"] + s["bytes_model"]:
        problems.append(f"{run.path}: bytes_total {s['bytes_total']} is not bytes_code + bytes_model")
    if s["bytes_total"] > LIMIT_BYTES:
        problems.append(f"{run.path}: artifact is {s['bytes_total']:,} bytes, over the {LIMIT_BYTES:,} byte cap "
                        f"by {s['bytes_total'] - LIMIT_BYTES:,}")
    limit = TIME_LIMIT_S[track]
    if limit and s.get("train_time_ms", 0) > 1000 * limit:
        problems.append(f"{run.path}: training took {s['train_time_ms'] / 1000:.1f} s, over the {limit:g} s limit")
    if limit and run.eval_time_ms > 1000 * limit:
        problems.append(f"{run.path}: the final evaluations took {run.eval_time_ms / 1000:.1f} s, "
                        f"over the {limit:g} s limit")
    return problems


def check_runs(runs: list[RunLog], track: str) -> None:
    """Refusal listing every problem: per log, then between logs (code, settings, seeds)."""
    problems = [p for run in runs for p in run_problems(run, track)]
    if not problems:
        hashes = {run.code_sha256 for run in runs}
        if len(hashes) > 1:
            problems.append("the logs ran different code: " +
                            ", ".join(f"{r.path.name} {r.code_sha256[:12]}" for r in runs))
        for key, values in config_differences(runs).items():
            problems.append(f"the logs differ in {key.upper()}: " +
                            ", ".join(f"{json.dumps(v)} ({r.path.name})" for r, v in zip(runs, values)))
        seeds = [run.seed for run in runs]
        if len(set(seeds)) != len(seeds):
            problems.append(f"the same SEED twice: {seeds}")
    if problems:
        raise Refusal("; ".join(problems))


def shipped_code(runs: list[RunLog], code: Path | None) -> bytes:
    """The file every seed ran: --code FILE, or the source embedded in the first log; its hash is checked."""
    expected = runs[0].code_sha256
    if code is not None:
        if not code.is_file():
            raise Refusal(f"--code {code}: file not found")
        data = code.read_bytes()
        what = f"--code {code}"
    else:
        data = runs[0].source
        if data is None:
            raise Refusal(f"{runs[0].path}: the embedded source does not hash to its code_sha256; pass --code FILE")
        what = f"the source embedded in {runs[0].path}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise Refusal(f"{what}: sha256 {digest[:12]}... is not the {expected[:12]}... the seeds ran")
    return data


# ---------------------------------------------------------------------------------------------
# What the folder says
# ---------------------------------------------------------------------------------------------


def hardware(run: RunLog) -> str:
    gpu, world = run.header.get("gpu", "unknown"), run.config.get("world_size", 1)
    return f"{world}x{gpu}" if gpu != "none" else f"CPU ({world} process{'es' if world > 1 else ''})"


def seed_results(runs: list[RunLog]) -> dict[str, dict]:
    return {str(r.seed): dict(val_bpb=r.summary["val_bpb"], val_loss=r.summary["val_loss"], steps=r.steps,
                              artifact_bytes=r.summary["bytes_total"], step_avg_ms=round(r.step_avg_ms, 2),
                              train_time_s=round(r.summary["train_time_ms"] / 1000, 1),
                              eval_time_s=round(r.eval_time_ms / 1000, 1))
            for r in runs}


def evaluation_description(cfg: dict) -> str:
    window = cfg.get("eval_seq_len") or cfg.get("train_seq_len")
    stride = cfg.get("eval_stride") or window
    text = f"windows of {window} tokens, stride {min(stride, window)}"
    if cfg.get("ttt_lr"):
        text += (f", then score-first TTT (SGD lr {cfg['ttt_lr']:g}, {cfg.get('ttt_epochs')} epoch(s) on each "
                 f"chunk of {cfg.get('ttt_chunk')} targets after scoring it; the last chunk is never trained on)")
    if cfg.get("mix_eta"):
        text += (f"; the score mixes the network with unigram, bigram and hashed-trigram experts counted from "
                 f"already-scored targets only, its weights stepped (MIX_ETA {cfg['mix_eta']:g}) once per chunk of "
                 f"{cfg.get('ttt_chunk')} targets after scoring it")
    return text


def compliance(runs: list[RunLog], track: str) -> dict:
    cfg, limit = runs[0].config, TIME_LIMIT_S[track] or 600.0
    max_train = max(r.summary["train_time_ms"] for r in runs) / 1000
    max_eval = max(r.eval_time_ms for r in runs) / 1000
    max_bytes = max(r.summary["bytes_total"] for r in runs)
    return dict(
        causal=True, normalized_distribution=True, score_before_update=True, single_pass=True,
        no_validation_data_in_training=True,
        gptq_calibration="training data, inside the training budget" if cfg.get("gptq") else "none",
        evaluation=evaluation_description(cfg),
        train_under_600s=max_train <= limit, eval_under_600s=max_eval <= limit,
        artifact_under_16mb=max_bytes <= LIMIT_BYTES, max_train_time_s=round(max_train, 1),
        max_eval_time_s=round(max_eval, 1), max_bytes_total=max_bytes, three_seeds=len(runs) >= 3)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def knob_defaults(code: bytes) -> dict:
    """Defaults of the shipped script's knobs (importing it does nothing but define them); the
    repository's train_gpt.py when the shipped file cannot be imported here."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_gpt.py"
        path.write_bytes(code)
        try:
            spec = importlib.util.spec_from_file_location("record_train_gpt", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, and say so
            print(f"note: cannot import the shipped train_gpt.py ({type(exc).__name__}: {exc}); "
                  "the command lists settings against this repository's defaults", file=sys.stderr)
            sys.path.insert(0, str(ROOT))
            import train_gpt as module
        finally:
            sys.modules.pop("record_train_gpt", None)
    return {f.name: f.default for f in dataclasses.fields(module.Config) if not f.metadata.get("derived")}


def command(runs: list[RunLog], defaults: dict) -> str:
    """The launch line: SEED, the settings that differ from the defaults, then python or torchrun."""
    cfg = runs[0].config
    skip = PER_RUN_SETTINGS - {"data_path", "tokenizer_path"}
    env = [f"SEED={runs[0].seed}"] + [f"{k.upper()}={shlex.quote(env_text(cfg[k]))}" for k in sorted(defaults)
                                      if k in cfg and k not in skip and cfg[k] != defaults[k]]
    world = cfg.get("world_size", 1)
    launcher = ("python3 train_gpt.py" if world == 1 and runs[0].header.get("gpu") == "none" else
                f"torchrun --standalone --nproc_per_node={world} train_gpt.py")
    lines, line = [], ""
    for item in env:
        if line and len(line) + len(item) > 96:
            lines.append(line)
            line = ""
        line = f"{line} {item}".strip()
    return " \\\n  ".join(lines + [line, launcher])


def results_table(runs: list[RunLog]) -> str:
    rows = ["| seed | val_bpb | val_loss | steps | ms/step | train s | eval s | artifact bytes | log |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r, (seed, s) in zip(runs, seed_results(runs).items()):
        rows.append(f"| {seed} | {s['val_bpb']:.8f} | {s['val_loss']:.8f} | {s['steps']} | {s['step_avg_ms']:.2f} | "
                    f"{s['train_time_s']:.1f} | {s['eval_time_s']:.1f} | {s['artifact_bytes']:,} | `{r.path.name}` |")
    bpb, std = mean_std([r.summary["val_bpb"] for r in runs])
    loss, _ = mean_std([r.summary["val_loss"] for r in runs])
    biggest = max(r.summary["bytes_total"] for r in runs)
    rows.append(f"| **mean** | **{bpb:.8f}** | {loss:.8f} | | | | | max {biggest:,} | |")
    return "\n".join(rows)


def readme(sub: dict, runs: list[RunLog], cmd: str, stats_lines: list[str] | None, against: str | None) -> str:
    c, seeds = sub["compliance"], ", ".join(str(s) for s in sub["seeds"])
    std = f" ± {sub['val_bpb_std']:.5f}" if sub["val_bpb_std"] is not None else ""
    score_kind = runs[0].summary["score_line"].split(" ")[0]
    mixed = score_kind.endswith("_mix")  # the n-gram mixer's score (MIX_ETA)
    parts = [
        f"# {sub['name']}\n", f"{sub['blurb']}\n",
        f"**val_bpb {sub['val_bpb']:.5f}{std}** (mean ± sample standard deviation over {len(runs)} seeds: {seeds}); "
        f"largest artifact {sub['bytes_total']:,} bytes ({sub['bytes_code']:,} of them code). "
        f"{sub['hardware']}, torch {sub['pytorch_version']}, {sub['train_shards']} train shards.\n",
        "## Results\n", results_table(runs) + "\n",
        f"Each score is the run's last final evaluation of the artifact reloaded from disk (`{score_kind}`); "
        "artifact bytes = the code file as shipped + the compressed model, both measured on disk.\n",
    ]
    if stats_lines:
        parts += [f"## Statistics against {against}\n", "```text\n" + "\n".join(stats_lines) + "\n```\n"]
    parts += [
        "## Command\n",
        f"From a checkout with the data in place; run once per seed ({seeds}), setting `SEED`. The variables "
        "are those that differ from this train_gpt.py's defaults (paths as they were on the machine that ran it).\n",
        f"```bash\n{cmd}\n```\n",
        "## Compliance\n",
        f"- Training: at most {c['max_train_time_s']:.1f} s; evaluation (all final evaluations): at most "
        f"{c['max_eval_time_s']:.1f} s; artifact: at most {c['max_bytes_total']:,} bytes "
        f"(limit {LIMIT_BYTES:,}).",
        "- Causal: each token's probability depends only on the tokens before it (causal attention"
        + ("; the n-gram experts count only targets already scored)." if mixed else ")."),
        "- Normalized: a softmax over the whole vocabulary at every position"
        + (", mixed with n-gram distributions that give every token mass (mixture weights sum to 1)." if mixed
           else "."),
        f"- Evaluation: {c['evaluation']}.",
        "- Score before update and single pass: every validation token is scored exactly once, and no score "
        "comes from weights that were trained on its token.",
        f"- No validation data during training; GPTQ calibration: {c['gptq_calibration']}.\n",
        "## Files\n",
        f"- `train_gpt.py`: exactly as run ({sub['bytes_code']:,} bytes, sha256 `{sub['code_sha256']}`, "
        "the `code_sha256` in every log)",
        *[f"- `{r.path.name}`: seed {r.seed}" for r in runs],
    ]
    if runs[0].config.get("compressor") == "brotli":
        parts.append("- `requirements.txt`: brotli")
    return "\n".join(parts) + "\n"


def submission(args, runs: list[RunLog], code: bytes, stats: dict | None) -> dict:
    bpb, std = mean_std([r.summary["val_bpb"] for r in runs])
    first = runs[0]
    return dict(
        author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb, date=args.date,
        track=args.track, val_loss=round(statistics.mean(r.summary["val_loss"] for r in runs), 8),
        val_bpb=round(bpb, 8), val_bpb_std=None if std is None else round(std, 8),
        seeds=[r.seed for r in runs], seed_results=seed_results(runs),
        bytes_total=max(r.summary["bytes_total"] for r in runs), bytes_code=len(code),
        code_sha256=hashlib.sha256(code).hexdigest(), hardware=hardware(first),
        pytorch_version=first.header.get("torch_version"), attention_backend=first.header.get("attention_backend"),
        train_shards=int(first.header["train_shards"]) if "train_shards" in first.header else None,
        compliance=compliance(runs, args.track), **({"statistics": stats} if stats else {}))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def statistics_against(runs: list[RunLog], against: str) -> tuple[dict, list[str]]:
    previous, label = welch.load_scores(against)
    new = [r.summary["val_bpb"] for r in runs]
    nats_per_bpb = statistics.mean(r.summary["val_loss"] / r.summary["val_bpb"] for r in runs)
    result = welch.judge(welch.welch(new, previous), nats_per_bpb)
    return dict(against=label, previous_val_bpb=previous, **result), welch.describe(result)


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """All files into a temporary folder beside `out`, renamed into place when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; a records folder is not
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders runs/<RUN_ID>/ (or their logs)")
    p.add_argument("--name", required=True, help="short name: letters, digits, '_', '-', '.'")
    p.add_argument("--track", default="10min_16mb", choices=sorted(TIME_LIMIT_S))
    p.add_argument("--out", type=Path, help="folder to write (default records/track_<track>/<date>_<name>/)")
    p.add_argument("--against", help="previous entry: a records folder, or comma-separated per-seed val_bpb")
    p.add_argument("--author", default="TODO")
    p.add_argument("--github-id", default="TODO")
    p.add_argument("--blurb", default="TODO: what this entry changes and why.")
    p.add_argument("--code", type=Path, help="the train_gpt.py the seeds ran (default: taken from the logs)")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default today)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '_', '-' and '.' only")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        p.error(f"--date {args.date!r}: expected YYYY-MM-DD")
    return args


def make_record(args) -> Path:
    out = args.out or ROOT / "records" / f"track_{args.track}" / f"{args.date}_{args.name}"
    if out.exists():
        raise Refusal(f"{out}: already exists; choose another --name or --out")
    runs = [read_log(path) for path in args.runs]
    names = [r.path.name for r in runs]
    if len(set(names)) != len(names) or "train_gpt.py" in names:
        raise Refusal(f"log file names must differ (they keep their names in the folder): {names}")
    check_runs(runs, args.track)
    code = shipped_code(runs, args.code)
    stats, stats_lines = statistics_against(runs, args.against) if args.against else (None, None)
    sub = submission(args, runs, code, stats)
    files = {"train_gpt.py": code, **{r.path.name: r.path.read_bytes() for r in runs},
             "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
             "README.md": readme(sub, runs, command(runs, knob_defaults(code)), stats_lines, args.against).encode()}
    if runs[0].config.get("compressor") == "brotli":
        files["requirements.txt"] = b"brotli\n"
    write_folder(out, files)
    if stats_lines:
        print("\n".join(stats_lines))
    std = sub["val_bpb_std"]
    print(f"val_bpb {sub['val_bpb']:.5f}" + (f" ± {std:.5f}" if std is not None else "") +
          f" over {len(runs)} seeds; largest artifact {sub['bytes_total']:,} bytes")
    if len(runs) < 3:
        print(f"note: {len(runs)} seed(s); reviewers usually ask for 3 or more", file=sys.stderr)
    if args.track == "10min_16mb" and not sub["hardware"].startswith("8x"):
        print(f"note: the 10min track is timed on 8xH100; these runs used {sub['hardware']}", file=sys.stderr)
    print(f"wrote {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        make_record(args)
    except (Refusal, LogError, welch.InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
