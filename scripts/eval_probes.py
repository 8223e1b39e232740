"""Probes of a train_gpt.py's evaluation on a tiny random model built from that very file: the evidence that
make_record.py writes into a record's compliance block, and a check of an evaluation change before paying for seeds.

Usage:
    python3 scripts/eval_probes.py [--code FILE] [VAR=VALUE ...]    # the run's variables; JSON on stdout

The model: GPT(build_config(...)) of the file, with the run's settings on a tiny shape (PROBE_SHAPE: vocabulary 64,
width 64, 2 heads of 32 dims, windows of 16 tokens, TTT chunks of 48 targets; the depth plan, block kinds and the
evaluation knobs are the run's), every weight randomized (zero-initialized projections and gates would hide a leak).
The text: 240 targets of random tokens in 4 documents. For each final evaluation evaluation_windows(cfg) lists
(round trip, sliding window, score-first TTT, LoRA TTT, mixed by the n-gram mixer), through evaluate() itself:
  single pass   every write to evaluate's nll_out is counted: each target is scored exactly once, and the
                val_loss and val_bpb evaluate returns are the mean of those scores and 1 byte per target
  causal        token j is changed (in the first window, mid-chunk, at a chunk's start, turned into a BOS, near
                the end): no score of a target before j - 1 (the targets predicting tokens before j) moves by more
                than TOLERANCE_NATS, and a later one does (the change was seen). Score-first TTT and the mixer's
                counts are covered too: an update on a chunk before it is scored would let a token of the chunk move
                an earlier score of that chunk
  mixer         (MIX_ETA > 0) from the tables the mixed evaluation built: the mixture's probability of every token
                of the vocabulary, at positions of the text and at a context never seen, sums to 1 within
                SUM_TOLERANCE and is > 0 everywhere; and the order of its calls: each count update covers targets
                already scored, once, and no score is mixed with counts of its own target or a later one
Exit status: 0 every probe passed; 1 one failed (the JSON says which); 2 bad arguments or settings.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE_NATS = 1e-5  # float32 rounding of a loss of a few nats is ~1e-7; a leak moves it by far more
SUM_TOLERANCE = 1e-6
TARGETS = 240
BOS_AT = (0, 57, 130, 190)
PERTURB_AT = (3, 30, 48, 100, 170, 238)  # first window; mid-chunk; a chunk's start (48); mid-chunk; the end
BOS_PERTURBATION = 170  # this one becomes a BOS (a new document starts inside one): later boundaries move
PROBE_SHAPE = dict(VOCAB_SIZE="64", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="16",
                   TRAIN_BATCH_TOKENS="256", MICRO_BATCH_TOKENS="256", VAL_BATCH_SIZE="128", TTT_CHUNK="48",
                   MIX_BUCKETS="61", TTT_LORA_RANK="4", TTT_LORA_CHUNK="8", PROG_DEPTH="", COMPILE="0")
RUN_ONLY = ("SEED", "RUN_ID", "DATA_PATH", "TOKENIZER_PATH", "OUT_DIR", "RESUME", "EVAL_ONLY", "TRAIN_ONLY",
            "CHECKPOINT_EVERY")


class ProbeError(Exception):
    """The settings cannot be probed (the message says why); not a failed probe."""


def load_module(code: bytes, name: str = "probed_train_gpt"):
    """The train_gpt.py source `code` as a module (importing it defines names and does nothing else)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_gpt.py"
        path.write_bytes(code)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(name, None)
    return module


def probe_env(settings: dict[str, str], tg) -> dict[str, str]:
    """The run's settings (environment variables) on the probe's tiny shape; the relations the evaluations depend
    on (a sliding stride below the window or not, a longer evaluation window, LoRA phases) kept."""
    run = tg.build_config(settings, 1)
    env = {k: v for k, v in settings.items() if k not in RUN_ONLY}
    env.update(PROBE_SHAPE)
    window, head_dim = int(PROBE_SHAPE["TRAIN_SEQ_LEN"]), int(PROBE_SHAPE["MODEL_DIM"]) // int(PROBE_SHAPE["NUM_HEADS"])
    run_window = run.train_seq_len
    env["EVAL_STRIDE"] = "0" if not run.eval_stride else str(window if run.eval_stride >= run_window else 4)
    run_head_dim = run.model_dim // run.num_heads  # partial RoPE stays partial, at the same fraction of the head
    env["ROPE_DIMS"] = str(min(head_dim, max(2, 2 * round(run.rope_dims * head_dim / run_head_dim / 2)))
                           if run.rope_dims and run.rope_dims < run_head_dim else 0)
    env["GATE_WINDOW"] = str(min(run.gate_window, int(PROBE_SHAPE["MODEL_DIM"])))
    env["TTT_PHASES"] = "2" if run.ttt_phases else ""
    return env


def probe_tokens(vocab: int, bos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, vocab, (TARGETS + 1,), generator=g, dtype=torch.int32)
    tokens[list(BOS_AT)] = bos
    return tokens


def random_model(tg, cfg):
    """GPT(cfg) with every weight moved at random: zero-init output projections, gates and lambdas would make
    positions independent and the probes vacuous."""
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


class ScoreLog:
    """Stands in for evaluate's nll_out (a tensor of one loss per target): keeps each score and counts the writes."""

    def __init__(self, n: int):
        self.dtype = torch.float64
        self.values = torch.full((n,), math.nan, dtype=torch.float64)
        self.writes = torch.zeros(n, dtype=torch.long)

    def __setitem__(self, index, value):
        positions = torch.arange(len(self.writes))[index].flatten()
        self.writes.index_add_(0, positions, torch.ones_like(positions))
        self.values[index] = value.to(torch.float64)


def run_evaluation(tg, model, cfg, tokens, window: int, stride: int, adapter: str, mixer):
    """The one call of train_gpt.evaluate: (val_loss, val_bpb, ScoreLog) of the tokens, 1 byte per target."""
    vocab = cfg.vocab_size
    tables = tg.ByteTables(torch.ones(vocab, dtype=torch.int16), torch.zeros(vocab, dtype=torch.bool),
                           torch.ones(vocab, dtype=torch.bool))
    log = ScoreLog(len(tokens) - 1)
    loss, bpb = tg.evaluate(model, tg.plan_for(cfg, cfg.eval_repeats or cfg.repeats), tokens, cfg, 0, 1, tables,
                            contextlib.nullcontext, window, stride, adapter, log, mixer=mixer)
    return loss, bpb, log


class MixerCalls:
    """Records the order of a mixer's calls: which targets each mix() scores and each update() counts."""

    def __init__(self, mixer, n: int):
        self.scored, self.counted = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        self.problems, self.updates, self.mixes = [], 0, 0
        real_mix, real_update = mixer.mix, mixer.update

        def mix(tokens, pos, nll):
            self.mixes += 1
            counted = self.counted.nonzero()
            if len(counted) and int(counted.max()) >= int(pos.min()):
                self.problems.append(f"targets from {int(pos.min())} mixed with counts up to target "
                                     f"{int(counted.max())}")
            self.scored[pos] += 1
            return real_mix(tokens, pos, nll)

        def update(tokens, a, b, world_size):
            self.updates += 1
            if not bool((self.scored[a:b] > 0).all()):
                self.problems.append(f"targets {a}..{b - 1} counted before all were scored")
            self.counted[a:b] += 1
            return real_update(tokens, a, b, world_size)
        mixer.mix, mixer.update = mix, update


def mixed_distribution(mixer, prev2: int, prev: int, network_logp: torch.Tensor) -> torch.Tensor:
    """p(y) for every y of the vocabulary after (prev2, prev), through mixer.mix on a copy (its state stays): one
    3-token text per candidate y, the network's distribution given as each candidate's nll."""
    probe, vocab = copy.deepcopy(mixer), len(network_logp)
    text = torch.stack([torch.full((vocab,), prev2), torch.full((vocab,), prev), torch.arange(vocab)], 1).flatten()
    return (-probe.mix(text.to(torch.int32), torch.arange(vocab) * 3 + 1, -network_logp)).exp()


def normalization(mixer, tokens: torch.Tensor, vocab: int) -> dict:
    g = torch.Generator().manual_seed(2)
    contexts = [(int(tokens[i - 1]), int(tokens[i])) for i in (20, 90, 150, 230)] + [(vocab - 1, vocab - 2)]
    sums, least = [], 1.0
    for prev2, prev in contexts:
        network = torch.log_softmax(3 * torch.randn(vocab, generator=g, dtype=torch.float64), 0)
        p = mixed_distribution(mixer, prev2, prev, network)
        sums.append(p.sum().item())
        least = min(least, p.min().item())
    worst = max(abs(s - 1) for s in sums)
    return dict(checked=True, passed=worst <= SUM_TOLERANCE and least > 0, positions=len(contexts),
                vocabulary=vocab, max_abs_sum_minus_1=worst, min_probability=least, tolerance=SUM_TOLERANCE,
                network="a normalized distribution (log-softmax) at each position",
                contexts="4 of the text's, after the whole text was counted, and one never seen")


def probe_kind(tg, model, cfg, tokens, kind: str, window: int, stride: int, adapter: str) -> dict:
    """Single-pass and causality evidence of one final evaluation (and the mixer's, when it mixes)."""
    n = len(tokens) - 1
    mixer = tg.NgramMixer(cfg, "cpu") if kind.endswith("_mix") else None
    calls = MixerCalls(mixer, n) if mixer is not None else None
    loss, bpb, log = run_evaluation(tg, model, cfg, tokens, window, stride, adapter, mixer)
    mean = log.values.mean().item()
    single = dict(each_target_once=bool((log.writes == 1).all()), min_writes=int(log.writes.min()),
                  max_writes=int(log.writes.max()), loss_is_their_mean=math.isclose(loss, mean, rel_tol=1e-6),
                  one_byte_each=math.isclose(bpb * math.log(2), loss, rel_tol=1e-9))
    single["passed"] = single["each_target_once"] and single["loss_is_their_mean"] and single["one_byte_each"]
    moved, seen, first_leak = 0.0, [], None
    for j in PERTURB_AT:
        changed = tokens.clone()
        changed[j] = tg.BOS_ID if j == BOS_PERTURBATION else 2 + (int(tokens[j]) - 1) % (cfg.vocab_size - 2)
        fresh = tg.NgramMixer(cfg, "cpu") if mixer is not None else None
        after = run_evaluation(tg, model, cfg, changed, window, stride, adapter, fresh)[2].values
        earlier = (after[:j - 1] - log.values[:j - 1]).abs()
        change = float(earlier.nan_to_num(math.inf).max()) if j > 1 else 0.0
        if change > TOLERANCE_NATS and first_leak is None:
            target = int((earlier.nan_to_num(math.inf) > TOLERANCE_NATS).nonzero()[0])
            first_leak = f"changing token {j} moved the score of target {target} by {change:.3g} nats"
        moved = max(moved, change)
        seen.append(bool((after[j - 1:] - log.values[j - 1:]).abs().max() > TOLERANCE_NATS))
    result = dict(kind=kind, window=window, stride=stride, adapter=adapter, single_pass=single,
                  causal=dict(passed=first_leak is None and all(seen), max_earlier_change_nats=moved,
                              change_seen=all(seen), first_leak=first_leak))
    if mixer is not None:
        order = dict(passed=not calls.problems and bool((calls.counted <= 1).all()), count_updates=calls.updates,
                     score_calls=calls.mixes, targets_counted=int((calls.counted > 0).sum()),
                     problems=calls.problems[:3])
        result["mixer"] = dict(score_first=order, normalized=normalization(mixer, tokens, cfg.vocab_size))
    return result


def probe(tg, settings: dict[str, str]) -> dict:
    """All probes of train_gpt module `tg` for a run with `settings` (its environment variables that differ from the
    defaults); 'passed' says whether every one held. ProbeError when the settings do not make a tiny model."""
    try:
        run_kinds = [(k, a) for k, _, _, a in tg.evaluation_windows(tg.build_config(settings, 1))]
        cfg = tg.build_config(probe_env(settings, tg), 1)
    except Exception as exc:  # noqa: BLE001 - the config's own error names the variable
        raise ProbeError(f"the settings do not build the probe's tiny model: {exc}") from None
    windows = tg.evaluation_windows(cfg)
    if [(k, a) for k, _, _, a in windows] != run_kinds:
        raise ProbeError(f"the probe's tiny shape evaluates {windows}, the run {run_kinds}")
    tokens = probe_tokens(cfg.vocab_size, tg.BOS_ID)
    model, threads = random_model(tg, cfg), torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend (10x slower on a loaded 2-core machine)
    try:
        kinds = [probe_kind(tg, model, cfg, tokens, *w) for w in windows]
    finally:
        torch.set_num_threads(threads)
    mixed = [k["mixer"] for k in kinds if "mixer" in k]
    passed = all(k["single_pass"]["passed"] and k["causal"]["passed"] for k in kinds) and all(
        m["score_first"]["passed"] and m["normalized"]["passed"] for m in mixed)
    return dict(passed=passed, targets=len(tokens) - 1, documents=len(BOS_AT), perturbed_tokens=list(PERTURB_AT),
                bos_inserted_at=BOS_PERTURBATION, tolerance_nats=TOLERANCE_NATS,
                model=f"{sum(p.numel() for p in model.parameters()):,} random parameters, "
                      + " ".join(f"{k}={v}" for k, v in PROBE_SHAPE.items() if k in ("VOCAB_SIZE", "MODEL_DIM",
                                                                                         "NUM_HEADS", "TRAIN_SEQ_LEN")),
                evaluations=kinds)


def failures(result: dict) -> list[str]:
    """One sentence per failed probe, naming the evaluation."""
    out = []
    for k in result["evaluations"]:
        s, c = k["single_pass"], k["causal"]
        if not s["passed"]:
            out.append(f"{k['kind']}: not single-pass (targets written {s['min_writes']}..{s['max_writes']} times; "
                       f"loss is their mean: {s['loss_is_their_mean']}; 1 byte each: {s['one_byte_each']})")
        if not c["passed"]:
            out.append(f"{k['kind']}: not causal ({c['first_leak'] or 'a perturbation moved no later score'})")
        for name, m in (k.get("mixer") or {}).items():
            if not m["passed"]:
                detail = m.get("problems") or (f"sums off by {m.get('max_abs_sum_minus_1')}, "
                                               f"min p {m.get('min_probability')}")
                out.append(f"{k['kind']}: the mixer is not {name.replace('_', '-')} ({detail})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", type=Path, default=ROOT / "train_gpt.py", help="the train_gpt.py to probe")
    p.add_argument("settings", nargs="*", metavar="VAR=VALUE", help="the run's variables")
    args = p.parse_args(argv)
    if not args.code.is_file() or any("=" not in s for s in args.settings):
        p.error("--code must be a file and each setting VAR=VALUE")
    try:
        tg = load_module(args.code.read_bytes())
    except Exception as exc:  # noqa: BLE001 - whatever the file raises as it is imported
        print(f"error: --code {args.code}: cannot be imported ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    try:
        result = probe(tg, dict(s.split("=", 1) for s in args.settings))
    except ProbeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    for line in failures(result):
        print(f"FAILED {line}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
