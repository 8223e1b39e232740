"""Build a review-ready records folder from the seed runs of one configuration.

Usage:
    python3 scripts/make_record.py runs/s1 runs/s2 runs/s3 --name SP8192_Loop3 \\
        [--track 10min_16mb|non_record_16mb] [--against PREVIOUS] [--author A --github-id G] \\
        [--blurb TEXT] [--code FILE] [--out FOLDER] [--date YYYY-MM-DD]

Each RUN_DIR is a run folder `runs/<RUN_ID>/` (or its log). The folder written
(default records/track_<track>/<date>_<NAME>/, which must not exist) holds the train_gpt.py the
seeds shipped and counted (the packed copy each run wrote beside its log, or --code FILE; either
way it must unpack to the code every log names by code_sha256), each seed's log as train_seed<SEED>.log,
submission.json and a README.md with the results table, the statistics and the exact command.

The compliance block of submission.json is what the probes of scripts/eval_probes.py found when
make_record ran them against the shipped train_gpt.py itself (imported from its bytes), with the
runs' settings on a tiny random model: every target scored once (single pass), no score moved by
a later token in any final evaluation (causal: round trip, sliding window, TTT, the n-gram mixer),
and, when the runs used the mixer (MIX_ETA > 0), its distribution over the whole vocabulary sums
to 1 and its counts are updated only after their chunk is scored. `blurb` is --blurb, else the
settings that differ from the shipped script's defaults; `technique_summary` and `attribution`
follow from the settings (--attribution KEY=TEXT adds or replaces an entry).

It refuses, naming the file and the reason, when a log is not a finished run, when the logs ran
different code or different settings (anything but SEED, RUN_ID, DATA_PATH, TOKENIZER_PATH,
OUT_DIR), when a seed's artifact is over 16,000,000 bytes, (10min track) when training or
evaluation took over 600 s, when the shipped train_gpt.py cannot be imported or fails a probe,
and without --blurb when the runs use the script's defaults (nothing to describe). --against
PREVIOUS (a records folder, or comma-separated per-seed val_bpb) adds the one-sided Welch t-test
that reviewers ask for (scripts/welch.py).
Exit status: 0 written, 2 refused or bad arguments (one `error:` line).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_probes  # noqa: E402
import welch  # noqa: E402
from train_gpt import code_only, unpack_code  # noqa: E402  (the packed format lives with the code that writes it)
from runlog import PER_RUN_SETTINGS, LogError, RunLog, config_differences, env_text, read_log  # noqa: E402

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
    if run.code_sha256 is None or run.shipped_code is None:
        problems.append(f"{run.path}: no code_sha256 or shipped_code line (an older train_gpt.py); rerun with this one")
    elif run.source is None:
        problems.append(f"{run.path}: the source it embeds does not hash to its code_sha256 (an edited log?)")
    elif not run.shipped_code.is_file():
        problems.append(f"{run.shipped_code}: the code file the run shipped is missing")
    else:
        shipped = run.shipped_code.read_bytes()
        if s["bytes_code"] != len(shipped):
            problems.append(f"{run.path}: final_summary counts {s['bytes_code']} code bytes, "
                            f"but the file it shipped, {run.shipped_code}, has {len(shipped)}")
        elif not same_program(shipped, run):
            problems.append(f"{run.shipped_code}: does not hold the program the run ran (the source in its log)")
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


def same_program(code: bytes, run: RunLog) -> bool:
    """Whether a code file (packed or not) runs the program whose source the run's log embeds (checked against its
    code_sha256 by runlog): the same syntax tree once comments and docstrings are set aside."""
    if run.source is None:
        return False
    try:
        return code_only(unpack_code(code)) == code_only(unpack_code(run.source))
    except (SyntaxError, ValueError, lzma.LZMAError):  # not Python, or a damaged packed file
        return False


def shipped_code(runs: list[RunLog], code: Path | None) -> bytes:
    """The code file the record ships: the one every seed shipped and counted (the run wrote it beside its log), or
    --code FILE; either way it must hold the program the seeds ran (the source their logs embed)."""
    if code is not None:
        if not code.is_file():
            raise Refusal(f"--code {code}: file not found")
        data, what = code.read_bytes(), f"--code {code}"
    else:
        files = {run.shipped_code.read_bytes() for run in runs}
        if len(files) > 1:
            raise Refusal("the seeds shipped different code files: " + ", ".join(str(r.shipped_code) for r in runs))
        data, what = files.pop(), str(runs[0].shipped_code)
    if not same_program(data, runs[0]):
        raise Refusal(f"{what}: does not hold the program the seeds ran (the source their logs embed)")
    return data


# ---------------------------------------------------------------------------------------------
# The shipped script, imported and probed
# ---------------------------------------------------------------------------------------------


def shipped_module(code: bytes):
    """The shipped train_gpt.py (the readable file or the packed wrapper) as a module, from its bytes."""
    try:
        return eval_probes.load_module(code, "record_train_gpt")
    except Exception as exc:  # noqa: BLE001 - any failure: its evaluation cannot be probed
        raise Refusal(f"the shipped train_gpt.py cannot be imported here ({type(exc).__name__}: {exc}); "
                      "its evaluation cannot be probed") from None


def knob_defaults(module) -> dict:
    """Defaults of the shipped script's knobs (its Config's fields that are environment variables)."""
    return {f.name: f.default for f in dataclasses.fields(module.Config) if not f.metadata.get("derived")}


def changed_settings(cfg: dict, defaults: dict) -> dict[str, str]:
    """The runs' settings that differ from the defaults, as environment variables (less the per-seed ones)."""
    return {k.upper(): env_text(cfg[k]) for k in sorted(defaults)
            if k in cfg and k not in PER_RUN_SETTINGS and cfg[k] != defaults[k]}


def probed(module, settings: dict[str, str], runs: list[RunLog]) -> dict:
    """eval_probes.probe of the shipped module; a Refusal naming each failed probe, or when the evaluations probed
    are not those the logs ran (the mixer's among them: no_ngram_cache follows from what ran)."""
    try:
        result = eval_probes.probe(module, settings)
    except eval_probes.ProbeError as exc:
        raise Refusal(f"the shipped train_gpt.py: {exc}") from None
    if not result["passed"]:
        raise Refusal("the shipped train_gpt.py fails the compliance probes: " +
                      "; ".join(eval_probes.failures(result)))
    probed_kinds = sorted(k["kind"] for k in result["evaluations"])
    for run in runs:
        if sorted(run.evals_by_kind()) != probed_kinds:
            raise Refusal(f"{run.path}: its final evaluations ({', '.join(sorted(run.evals_by_kind()))}) are not "
                          f"those its settings give ({', '.join(probed_kinds)})")
    return result


# ---------------------------------------------------------------------------------------------
# What the folder says
# ---------------------------------------------------------------------------------------------


def hardware(run: RunLog) -> str:
    gpu, world = run.header.get("gpu", "unknown"), run.config.get("world_size", 1)
    return f"{world}x{gpu}" if gpu != "none" else f"CPU ({world} process{'es' if world > 1 else ''})"


def log_name(run: RunLog) -> str:
    return f"train_seed{run.seed}.log"  # upstream's name for a seed's log


def seed_results(runs: list[RunLog]) -> dict[str, dict]:
    return {str(r.seed): dict(val_bpb=r.summary["val_bpb"], val_loss=r.summary["val_loss"], steps=r.steps,
                              artifact_bytes=r.summary["bytes_total"], step_avg_ms=round(r.step_avg_ms, 2),
                              train_time_s=round(r.summary["train_time_ms"] / 1000, 1),
                              eval_time_s=round(r.eval_time_ms / 1000, 1))
            for r in runs}


def evaluation_description(cfg: dict) -> str:
    window = cfg.get("train_seq_len")
    stride = cfg.get("eval_stride") or window
    text = f"windows of {window} tokens, stride {min(stride, window)}"
    if cfg.get("ttt_lr") and cfg.get("ttt_adapter", "sgd") == "lora":
        text += (f", then score-first LoRA TTT (rank {cfg.get('ttt_lora_rank')}, a document's chunks of "
                 f"{cfg.get('ttt_lora_chunk')} targets scored, then trained on; adapters reset at each BOS"
                 + (f"; all weights trained on the documents scored so far after {cfg['ttt_phases']}" if
                    cfg.get("ttt_phases") else "") + ")")
    elif cfg.get("ttt_lr"):
        text += (f", then score-first TTT (SGD lr {cfg['ttt_lr']:g}, {cfg.get('ttt_epochs')} epoch(s) on each "
                 f"chunk of {cfg.get('ttt_chunk')} targets after scoring it; the last chunk is never trained on)")
    if cfg.get("mix_eta"):
        text += (f"; the score mixes the network with unigram, bigram and hashed-trigram experts counted from "
                 f"already-scored targets only, its weights stepped (MIX_ETA {cfg['mix_eta']:g}) once per chunk of "
                 f"{cfg.get('ttt_chunk')} targets after scoring it")
    return text


MIXER_ARGUMENT = (
    "The trigram expert is a hashed n-gram cache built from the validation text as it is scored, and it does not "
    "leak: (1) its key is a hash of the two tokens before the target, never the target, so the row a position reads "
    "is fixed before its target is known, and the target only picks its own entry of that row; (2) every row, "
    "interpolated (Witten-Bell) with the bigram, unigram and uniform distributions, is a distribution over the whole "
    "vocabulary, and the mixture with the network's softmax sums to 1 at every position (probed above); (3) a chunk's "
    "targets are counted only after the chunk is scored. Reviewers disqualified the caches of PR #982 because they "
    "put the target into the lookup and did not renormalize over the vocabulary; the merged record of PR #1514 "
    "applied a causal, prefix-only n-gram tilt to the full softmax. This mixer is causal and normalized like the "
    "latter; unlike it, it hashes its trigram contexts (collisions merge contexts and blunt the expert, they never "
    "bring the target into the key). MIX_ETA=0 turns the mixer off: no statistics built at evaluation time.")


def mixer_block(cfg: dict, probes: dict) -> dict | None:
    """The n-gram mixer's settings and evidence, when a final evaluation was mixed (MIX_ETA > 0)."""
    mixed = [k for k in probes["evaluations"] if "mixer" in k]
    if not mixed:
        return None
    evidence = mixed[-1]["mixer"]
    order, norm = evidence["score_first"], evidence["normalized"]
    return dict(
        ran=True, evaluation=mixed[-1]["kind"], mix_eta=cfg.get("mix_eta"), mix_buckets=cfg.get("mix_buckets"),
        chunk_targets=cfg.get("ttt_chunk"),
        experts="the network's softmax, unigram, bigram and context-hashed trigram counts (Witten-Bell interpolated "
                "down to uniform), mixed with weights stepped once per chunk by an exponentiated gradient",
        normalized_over_vocabulary=dict(checked=True, **{k: norm[k] for k in (
            "positions", "vocabulary", "max_abs_sum_minus_1", "min_probability", "tolerance", "contexts")}),
        context_only_keys=dict(checked=True, targets_probed=probes["targets"], by="the causal probe of the mixed "
                               "evaluation: changing a token moved no score of an earlier target"),
        score_first=dict(checked=True, count_updates=order["count_updates"], score_calls=order["score_calls"],
                         targets_counted=order["targets_counted"],
                         rule="each update counts targets already scored, once; no score reads a count of its own "
                              "target or a later one"),
        hashed_ngram_cache=True, why_it_does_not_leak=MIXER_ARGUMENT, off_switch="MIX_ETA=0")


def compliance(runs: list[RunLog], track: str, probes: dict) -> dict:
    """The compliance block: limits from the logs; causal, single pass, normalized and score-first from the probes
    of the shipped script (eval_probes.py); the n-gram mixer's settings and evidence when it ran."""
    cfg, limit = runs[0].config, TIME_LIMIT_S[track] or 600.0
    max_train = max(r.summary["train_time_ms"] for r in runs) / 1000
    max_eval = max(r.eval_time_ms for r in runs) / 1000
    max_bytes = max(r.summary["bytes_total"] for r in runs)
    kinds, n = [k["kind"] for k in probes["evaluations"]], probes["targets"]
    mixer = mixer_block(cfg, probes)
    ttt = bool(cfg.get("ttt_lr"))
    updates = (["a TTT step"] if ttt else []) + (["an n-gram count update"] if mixer else [])
    return dict(
        train_under_600s=max_train <= limit, eval_under_600s=max_eval <= limit,
        artifact_under_16mb=max_bytes <= LIMIT_BYTES, three_seeds=len(runs) >= 3,
        max_train_time_s=round(max_train, 1), max_eval_time_s=round(max_eval, 1), max_bytes_total=max_bytes,
        causal=dict(checked=True, targets_probed=n, evaluations=kinds, perturbed_tokens=probes["perturbed_tokens"],
                    bos_inserted_at=probes["bos_inserted_at"],
                    max_earlier_change_nats=max(k["causal"]["max_earlier_change_nats"] for k in probes["evaluations"]),
                    tolerance_nats=probes["tolerance_nats"]),
        single_pass=dict(checked=True, targets_probed=n, evaluations=kinds, each_target_scored_once=True,
                         loss_is_the_mean_of_the_scores=True),
        normalized_distribution=dict(softmax="the network's logits through a softmax over the vocabulary",
                                     **({"mixture": mixer["normalized_over_vocabulary"]} if mixer else {})),
        test_time_training=cfg.get("ttt_adapter", "sgd") if ttt else "none",
        **({"score_first_ttt": True} if ttt else {}),
        score_before_update=dict(checked=True, updates=updates or "none: nothing adapts during these evaluations",
                                 **({"by": f"the causal probe: {' or '.join(updates)} on a chunk before its scoring "
                                    "would let a token changed mid-chunk move an earlier score of that chunk; none "
                                    "moved"} if updates else {}),
                                 **({"mixer_calls": mixer["score_first"]} if mixer else {})),
        no_ngram_cache=mixer is None, hashed_ngram_cache=mixer is not None,
        **({"ngram_mixer": mixer} if mixer else {}),
        no_validation_data_in_training=dict(probed=False, basis="train_gpt.py reads fineweb_val_* for evaluation "
                                            "only; GPTQ calibrates on training batches (the logs' gptq_calibration "
                                            "line)"),
        gptq_calibration="training data, inside the training budget" if cfg.get("gptq") else "none",
        evaluation=evaluation_description(cfg), probe_model=probes["model"])


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


QUIET_SETTINGS = {"TRAIN_LOG_EVERY", "CHECKPOINT_EVERY"}  # how often it logs or saves: nothing the entry is


def auto_blurb(runs: list[RunLog], defaults: dict) -> str | None:
    """The settings that differ from the shipped script's defaults, as a sentence; None when there are none."""
    changed = {k: v for k, v in changed_settings(runs[0].config, defaults).items() if k not in QUIET_SETTINGS}
    if not changed:
        return None
    kind = runs[0].summary["score_line"].split(" ")[0]
    return (f"train_gpt.py with {', '.join(f'{k}={shlex.quote(v)}' for k, v in changed.items())} (the settings that "
            f"differ from its defaults), scored by `{kind}`: {evaluation_description(runs[0].config)}.")


def technique_summary(cfg: dict) -> str:
    """The model, training, export and evaluation in one line, from the settings."""
    unique, repeats = cfg.get("unique_blocks") or cfg["num_layers"], cfg.get("repeats", 1)
    head_dim = cfg["model_dim"] // cfg["num_heads"]
    loop = (f", blocks {cfg['loop_start']}-{cfg['core_last']} looped {repeats}x" if repeats > 1 else "") + \
        (f" from {cfg['depth_phases'][0][0]:.0%} of the run" if len(cfg.get("depth_phases") or ()) > 1 else "")
    parts = [f"SP{cfg['vocab_size']}", f"{unique} blocks x {cfg['model_dim']} ({cfg['num_layers']} layers{loop})",
             f"MLP {cfg['mlp_mult']:g}x {cfg['mlp_act']}"]
    optional = [
        (cfg.get("xsa_last_n"), "XSA on " + ("every layer" if cfg.get("xsa_last_n") == -1 else
                                              f"the last {cfg.get('xsa_last_n')} layers")),
        (cfg.get("rope_dims"), f"partial RoPE {cfg.get('rope_dims')}/{head_dim}"),
        (cfg.get("ln_scale"), "LN scale"),
        (0 <= cfg.get("parallel_residual_start", -1) < unique,
         f"parallel residuals from block {cfg.get('parallel_residual_start')}"),
        (0 <= cfg.get("parallel_lanes_start", -1) < unique,
         f"2-lane decoder from block {cfg.get('parallel_lanes_start')}"),
        (cfg.get("skip_gates_enabled"), "gated U-Net skips"), (cfg.get("smear_gate"), "BOS-masked smear gate"),
        (cfg.get("doc_mask"), "document-masked attention"),
        (True, f"Muon ({cfg.get('muon_ns')} Newton-Schulz" +
         (", row-normalized)" if cfg.get("muon_row_normalize") else ")")),
        (cfg.get("ema_horizon") and cfg.get("export_weights") == "ema", "EMA"),
        (cfg.get("export_weights") == "swa", "SWA"),
        (True, f"{'GPTQ ' if cfg.get('gptq') else ''}int{cfg.get('quant_bits_attn')}/{cfg.get('quant_bits_mlp')}/"
               f"{cfg.get('quant_bits_embed')} + {cfg.get('compressor')}"),
        ((cfg.get("eval_stride") or 0) < cfg["train_seq_len"] and cfg.get("eval_stride"),
         f"sliding window (stride {cfg.get('eval_stride')})"),
        (cfg.get("ttt_lr") and cfg.get("ttt_adapter") == "sgd",
         f"score-first TTT (SGD, {cfg.get('ttt_epochs')} epochs)"),
        (cfg.get("ttt_lr") and cfg.get("ttt_adapter") == "lora", "score-first LoRA TTT" +
         (f" (phases at {cfg.get('ttt_phases')} documents)" if cfg.get("ttt_phases") else "")),
        (cfg.get("mix_eta"), f"n-gram mixer (MIX_ETA={cfg.get('mix_eta'):g})"),
    ]
    return " + ".join(parts + [text for on, text in optional if on])


# Where the accepted records say each piece comes from (their submission.json attribution fields and the 2026-04-27
# record's source table): key, whether the runs used it, credit.
ATTRIBUTION = (
    ("sp8192_gptq_sdclip", lambda c, u: c["vocab_size"] == 8192 or c.get("gptq"), "@clarkkev (PR #1394)"),
    ("depth_recurrence", lambda c, u: c.get("repeats", 1) > 1, "@dexhunter (PR #1331, #1437); PR #1344"),
    ("triple_recurrence_parallel_residuals", lambda c, u: c.get("repeats", 1) == 3 and 0 <= c.get(
        "parallel_residual_start", -1) < u, "@bigbag (PR #1493)"),
    ("parallel_residuals", lambda c, u: 0 <= c.get("parallel_residual_start", -1) < u,
     "@msisovic (PR #1204), @Robby955 (PR #1412)"),
    ("parallel_decoder_lanes", lambda c, u: 0 <= c.get("parallel_lanes_start", -1) < u, "PR #1530"),
    ("xsa", lambda c, u: c.get("xsa_last_n"), "PR #478"),
    ("partial_rope_ln_scale", lambda c, u: c.get("rope_dims") or c.get("ln_scale"), "PR #315"),
    ("leaky_relu_squared", lambda c, u: c.get("mlp_act") == "leaky_relu2", "PR #493"),
    ("unet_skip_gates", lambda c, u: c.get("skip_gates_enabled"), "PR #289"),
    ("qk_gain", lambda c, u: True, "PR #259; 5.0 from PR #1276"),
    ("smear_gate_bos_fix", lambda c, u: c.get("smear_gate"), "PR #1667; BOS mask: @aquariouseworkman (PR #1851)"),
    ("polar_express_ns_min_lr", lambda c, u: c.get("muon_ns") == "polar" or c.get("min_lr"),
     "PR #1344; @nprime06 (PR #1787)"),
    ("ema", lambda c, u: c.get("ema_horizon"), "@jfprincz (PR #287)"),
    ("doc_masked_attention", lambda c, u: c.get("doc_mask"), "@samacqua (PR #1530)"),
    ("legal_ttt_framework", lambda c, u: c.get("ttt_lr"), "@abaybektursun (PR #549)"),
    ("phased_lora_ttt", lambda c, u: c.get("ttt_lr") and c.get("ttt_adapter") == "lora",
     "@samacqua (PR #1530), @romeerp (PR #1610), PR #1626"),
    ("ngram_mixer", lambda c, u: c.get("mix_eta"), "this repository's train_gpt.py (NgramMixer)"),
)


def attribution(cfg: dict, extra: list[str]) -> dict[str, str]:
    unique = cfg.get("unique_blocks") or cfg["num_layers"]
    credits = {key: credit for key, used, credit in ATTRIBUTION if used(cfg, unique)}
    credits.update(item.split("=", 1) for item in extra)
    return credits


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
                    f"{s['train_time_s']:.1f} | {s['eval_time_s']:.1f} | {s['artifact_bytes']:,} | `{log_name(r)}` |")
    bpb, std = mean_std([r.summary["val_bpb"] for r in runs])
    loss, _ = mean_std([r.summary["val_loss"] for r in runs])
    biggest = max(r.summary["bytes_total"] for r in runs)
    rows.append(f"| **mean** | **{bpb:.8f}** | {loss:.8f} | | | | | max {biggest:,} | |")
    return "\n".join(rows)


def compliance_lines(c: dict) -> list[str]:
    causal, single = c["causal"], c["single_pass"]
    kinds = ", ".join(causal["evaluations"])
    mixer = c.get("ngram_mixer")
    lines = [
        f"- Training: at most {c['max_train_time_s']:.1f} s; evaluation (all final evaluations): at most "
        f"{c['max_eval_time_s']:.1f} s; artifact: at most {c['max_bytes_total']:,} bytes (limit {LIMIT_BYTES:,}).",
        f"- Evaluation: {c['evaluation']}.",
        f"- Probed, by `scripts/make_record.py` on this train_gpt.py itself (a tiny random model built from it with "
        f"these settings, {c['probe_model']}; `python3 scripts/eval_probes.py --code train_gpt.py VAR=VALUE ...` "
        f"reruns it), in each final evaluation ({kinds}):",
        f"  - causal: changing token j (j = {', '.join(map(str, causal['perturbed_tokens']))}; at "
        f"{causal['bos_inserted_at']} into a BOS) moved no score of a target before it (largest change "
        f"{causal['max_earlier_change_nats']:.1e} nats, tolerance {causal['tolerance_nats']:g}), but later ones;",
        f"  - single pass: each of the {single['targets_probed']} targets was scored exactly once, and the reported "
        "loss is the mean of those scores;",
        "  - score before update: " + (c["score_before_update"]["by"] if "by" in c["score_before_update"] else
                                       "nothing adapts during these evaluations") +
        (f"; the mixer's calls were logged too: {mixer['score_first']['count_updates']} count updates, each of "
         "targets already scored, and no score read a count of its own target or a later one." if mixer else "."),
    ]
    if mixer:
        norm = mixer["normalized_over_vocabulary"]
        lines.append(f"  - normalized: the mixture's probabilities over all {norm['vocabulary']} tokens sum to 1 "
                     f"within {norm['max_abs_sum_minus_1']:.1e} at {norm['positions']} positions (tolerance "
                     f"{norm['tolerance']:g}), each > 0 (least {norm['min_probability']:.1e}).")
    else:
        lines.append("  - normalized: the network's softmax over the whole vocabulary; no n-gram statistics are built "
                     "at evaluation (`no_ngram_cache`).")
    lines.append(f"- No validation data during training; GPTQ calibration: {c['gptq_calibration']}.\n")
    if mixer:
        lines += ["## The n-gram mixer\n",
                  "The score mixes the network with n-gram experts built during evaluation "
                  f"(`MIX_ETA={mixer['mix_eta']:g}`, `MIX_BUCKETS={mixer['mix_buckets']}`, weights stepped per chunk "
                  f"of {mixer['chunk_targets']} "
                  f"targets; `{mixer['evaluation']}`), so `submission.json` says `\"hashed_ngram_cache\": true` and "
                  "`\"no_ngram_cache\": false`. " + mixer["why_it_does_not_leak"] + "\n"]
    return lines


def readme(sub: dict, runs: list[RunLog], cmd: str, stats_lines: list[str] | None, against: str | None) -> str:
    c, seeds = sub["compliance"], ", ".join(str(s) for s in sub["seeds"])
    std = f" ± {sub['val_bpb_std']:.5f}" if sub["val_bpb_std"] is not None else ""
    score_kind = runs[0].summary["score_line"].split(" ")[0]
    parts = [
        f"# {sub['name']}\n", f"{sub['blurb']}\n", f"Techniques: {sub['technique_summary']}.\n",
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
        "## Compliance\n", *compliance_lines(c),
        "## Attribution\n", *[f"- {key}: {credit}" for key, credit in sub["attribution"].items()], "",
        "## Files\n",
        f"- `train_gpt.py`: exactly as run ({sub['bytes_code']:,} bytes, sha256 `{sub['code_sha256']}`, "
        "the `code_sha256` in every log)",
        *[f"- `{log_name(r)}`: seed {r.seed} (the run's `{r.path.name}`)" for r in runs],
    ]
    if runs[0].config.get("compressor") == "brotli":
        parts.append("- `requirements.txt`: brotli")
    return "\n".join(parts) + "\n"


def submission(args, runs: list[RunLog], code: bytes, stats: dict | None, probes: dict, blurb: str) -> dict:
    bpb, std = mean_std([r.summary["val_bpb"] for r in runs])
    first = runs[0]
    return dict(
        author=args.author, github_id=args.github_id, name=args.name, blurb=blurb, date=args.date,
        track=args.track, val_loss=round(statistics.mean(r.summary["val_loss"] for r in runs), 8),
        val_bpb=round(bpb, 8), val_bpb_std=None if std is None else round(std, 8),
        seeds=[r.seed for r in runs], seed_results=seed_results(runs),
        bytes_total=max(r.summary["bytes_total"] for r in runs), bytes_code=len(code),
        code_sha256=hashlib.sha256(code).hexdigest(), hardware=hardware(first),
        pytorch_version=first.header.get("torch_version"), attention_backend=first.header.get("attention_backend"),
        train_shards=int(first.header["train_shards"]) if "train_shards" in first.header else None,
        technique_summary=args.technique_summary or technique_summary(first.config),
        attribution=attribution(first.config, args.attribution),
        compliance=compliance(runs, args.track, probes), **({"statistics": stats} if stats else {}))


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
    p.add_argument("--blurb", help="what this entry changes and why (default: the settings that differ from the "
                                   "defaults; required when none do)")
    p.add_argument("--technique-summary", help="one line of techniques (default: from the settings)")
    p.add_argument("--attribution", action="append", default=[], metavar="KEY=TEXT",
                   help="add or replace a credit (default: those of the techniques the settings use)")
    p.add_argument("--code", type=Path, help="the train_gpt.py the seeds ran (default: taken from the logs)")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default today)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '_', '-' and '.' only")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        p.error(f"--date {args.date!r}: expected YYYY-MM-DD")
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError as exc:  # 2024-13-45: the right shape, no such day
        p.error(f"--date {args.date!r}: {exc}")
    for item in args.attribution:
        if not re.fullmatch(r"[A-Za-z0-9_]+=.+", item):
            p.error(f"--attribution {item!r}: expected KEY=TEXT")
    return args


def make_record(args) -> Path:
    out = args.out or ROOT / "records" / f"track_{args.track}" / f"{args.date}_{args.name}"
    if out.exists():
        raise Refusal(f"{out}: already exists; choose another --name or --out")
    runs = [read_log(path) for path in args.runs]
    check_runs(runs, args.track)  # seeds differ, so do their logs' names, train_seed<SEED>.log
    code = shipped_code(runs, args.code)
    module = shipped_module(code)
    defaults = knob_defaults(module)
    blurb = args.blurb or auto_blurb(runs, defaults)
    if not blurb:
        raise Refusal("the runs use the shipped train_gpt.py's defaults, so there is nothing to describe: say what "
                      "this entry changes and why with --blurb TEXT")
    print("probing the shipped train_gpt.py's evaluation on a tiny random model ...", file=sys.stderr)
    probes = probed(module, changed_settings(runs[0].config, defaults), runs)
    print(f"probes hold in {', '.join(k['kind'] for k in probes['evaluations'])}: causal, single pass" +
          (", the mixer normalized and score-first" if any("mixer" in k for k in probes["evaluations"]) else ""))
    stats, stats_lines = statistics_against(runs, args.against) if args.against is not None else (None, None)
    sub = submission(args, runs, code, stats, probes, blurb)
    files = {"train_gpt.py": code, **{log_name(r): r.path.read_bytes() for r in runs},
             "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
             "README.md": readme(sub, runs, command(runs, defaults), stats_lines, args.against).encode()}
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
