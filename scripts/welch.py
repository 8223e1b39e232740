"""One-sided Welch t-test of per-seed val_bpb: does a new entry beat the previous one?

Usage:
    python scripts/welch.py NEW PREVIOUS          # each: a records folder, or scores "1.081,1.080,1.082"

Reviewers compare a new record's per-seed val_bpb with the previous frontier entry's by a
one-sided Welch t-test (unequal variances): H1 is "the new mean is lower". Two rules are
reported: the challenge README's (an improvement of at least 0.005 nats and p < 0.01) and the
leaderboard's current practice (p < 0.25). The Student t distribution is computed here (the
regularized incomplete beta function by its continued fraction), so no scipy is needed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

README_RULE = dict(min_nats=0.005, p=0.01)
PRACTICE_RULE = dict(p=0.25)
SCORE_KEYS = ("val_bpb", "bpb", "val_bpb_exact", "score", "final_val_bpb")


class InputError(Exception):
    """Unusable scores; the message names the argument or file."""


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by the continued fraction (modified
    Lentz), evaluated on the side of x where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df (not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def welch(new: list[float], previous: list[float]) -> dict:
    """One-sided Welch test of mean(new) < mean(previous). Needs 2+ scores on each side."""
    if len(new) < 2 or len(previous) < 2:
        raise InputError(f"the Welch test needs at least 2 scores on each side (got {len(new)} and {len(previous)})")
    m1, m2 = statistics.mean(new), statistics.mean(previous)
    v1, v2 = statistics.variance(new), statistics.variance(previous)
    a, b = v1 / len(new), v2 / len(previous)
    delta = m2 - m1  # positive: the new entry is better (lower bpb)
    if a + b == 0:
        t, df = (math.copysign(math.inf, delta) if delta else 0.0), float(len(new) + len(previous) - 2)
        p = 0.0 if delta > 0 else 1.0 if delta < 0 else 0.5
    else:
        t = delta / math.sqrt(a + b)
        df = (a + b) ** 2 / (a * a / (len(new) - 1) + b * b / (len(previous) - 1))
        p = t_sf(t, df)
    return dict(n_new=len(new), n_previous=len(previous), mean_new=m1, mean_previous=m2, std_new=math.sqrt(v1),
                std_previous=math.sqrt(v2), delta_bpb=delta, t=t, df=df, p=p)


def judge(result: dict, nats_per_bpb: float | None) -> dict:
    """Add the improvement in nats (per token) and the verdict of both rules to a welch() result."""
    out = dict(result)
    out["nats_per_bpb"] = nats_per_bpb
    out["delta_nats"] = result["delta_bpb"] * nats_per_bpb if nats_per_bpb else None
    enough = out["delta_nats"] is not None and out["delta_nats"] >= README_RULE["min_nats"]
    significant = result["p"] < README_RULE["p"]
    passes = None if significant and out["delta_nats"] is None else bool(significant and enough)
    out["readme_rule"] = dict(README_RULE, passes=passes)  # None: significant, but the nats are unknown
    better = result["delta_bpb"] > 0
    out["practice_rule"] = dict(PRACTICE_RULE, passes=bool(better and result["p"] < PRACTICE_RULE["p"]))
    return out


def describe(s: dict) -> list[str]:
    """Plain-text lines for a judge() result (printed, and written into the records README)."""
    nats = (f"{s['delta_nats']:+.5f} nats per token (bpb delta x {s['nats_per_bpb']:.4f}, the mean val_loss/val_bpb "
            f"of the new seeds = ln2 x bytes per token)" if s["delta_nats"] is not None else
            "? nats (unknown without the new seeds' val_loss/val_bpb)")
    verdict = {True: "PASSES", False: "fails", None: "unknown (the improvement in nats is unknown)"}
    return [
        f"new: mean {s['mean_new']:.5f} bpb, std {s['std_new']:.5f} over {s['n_new']} seeds; "
        f"previous: mean {s['mean_previous']:.5f}, std {s['std_previous']:.5f} over {s['n_previous']} seeds",
        f"improvement: {s['delta_bpb']:+.5f} bpb = {nats}",
        f"one-sided Welch t-test (H1: new mean < previous mean): t = {s['t']:.3f}, "
        f"Welch-Satterthwaite df = {s['df']:.2f}, p = {s['p']:.4g}",
        f"challenge README rule (>= {README_RULE['min_nats']} nats and p < {README_RULE['p']}): "
        f"{verdict[s['readme_rule']['passes']]}",
        f"leaderboard practice (p < {PRACTICE_RULE['p']}): {verdict[s['practice_rule']['passes']]}",
    ]


def positive(score: float, where: str) -> float:
    """A score as it is, or InputError: a val_bpb is a positive, finite number (nan, inf or <= 0 is a typo)."""
    if not 0 < score < math.inf:
        raise InputError(f"{where}: {score:g} is not a val_bpb (a positive, finite number)")
    return score


def score_of(entry, where: str) -> float:
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return positive(float(entry), where)
    if isinstance(entry, dict):
        for key in SCORE_KEYS:
            if isinstance(entry.get(key), (int, float)):
                return positive(float(entry[key]), where)
    raise InputError(f"{where}: no val_bpb in {json.dumps(entry)[:80]}")


def scores_from_submission(path: Path) -> list[float]:
    """Per-seed scores of a published submission.json: seed_results as {seed: {val_bpb|bpb: x}},
    {seed: x} or [{seed, val_bpb}], else a list under val_bpb_seeds / val_bpbs / seed_val_bpb."""
    try:
        sub = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(sub, dict):
        raise InputError(f"{path}: expected a JSON object (a submission.json), not {type(sub).__name__}")
    results = sub.get("seed_results")
    if isinstance(results, dict) and results:
        return [score_of(v, f"{path}: seed_results[{k}]") for k, v in results.items()]
    if isinstance(results, list) and results:
        return [score_of(v, f"{path}: seed_results[{i}]") for i, v in enumerate(results)]
    for key in ("val_bpb_seeds", "val_bpbs", "seed_val_bpb", "per_seed_val_bpb"):
        if isinstance(sub.get(key), list) and sub[key]:
            return [score_of(v, f"{path}: {key}") for v in sub[key]]
    raise InputError(f"{path}: no per-seed scores (seed_results) in it")


def nats_per_bpb(spec: str) -> float | None:
    """Mean val_loss/val_bpb over the seeds of a records folder (or submission.json), when it says."""
    path = Path(spec) / "submission.json" if Path(spec).is_dir() else Path(spec)
    try:
        results = json.loads(path.read_text(encoding="utf-8")).get("seed_results")
        return statistics.mean(r["val_loss"] / r["val_bpb"] for r in results.values())
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, statistics.StatisticsError):
        return None


def load_scores(spec: str) -> tuple[list[float], str]:
    """Scores from a records folder (its submission.json), a submission.json, or "1.08,1.09"; and a label."""
    if not spec.strip():
        raise InputError(f"{spec!r}: no scores")
    path = Path(spec)
    if path.is_dir():
        path = path / "submission.json"
        if not path.is_file():
            raise InputError(f"{spec}: no submission.json in this folder")
    if path.is_file():
        return scores_from_submission(path), str(Path(spec))
    try:
        scores = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{spec!r}: neither a records folder nor comma-separated scores") from None
    if not scores:
        raise InputError(f"{spec!r}: no scores")
    scores = [positive(s, repr(spec)) for s in scores]
    return scores, "scores " + ", ".join(f"{s:g}" for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new", help="records folder or comma-separated val_bpb of the new entry")
    parser.add_argument("previous", help="records folder or comma-separated val_bpb of the previous entry")
    parser.add_argument("--nats-per-bpb", type=float, default=None,
                        help="val_loss/val_bpb of the new runs, to state the improvement in nats "
                             "(default: from NEW's seed_results when it is a records folder)")
    args = parser.parse_args()
    if args.nats_per_bpb is not None and not 0 < args.nats_per_bpb < math.inf:
        parser.error(f"--nats-per-bpb {args.nats_per_bpb:g}: must be a finite number above 0 (val_loss / val_bpb of "
                     "the new runs)")
    try:
        new, _ = load_scores(args.new)
        previous, _ = load_scores(args.previous)
        result = judge(welch(new, previous), args.nats_per_bpb or nats_per_bpb(args.new))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(describe(result)))


if __name__ == "__main__":
    main()
