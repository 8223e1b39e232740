"""Dry run of train_gpt.py: what a run with this environment would decide up front, and a few timed steps.

Usage (the same variables and launcher as the run it stands for):
    NUM_UNIQUE_LAYERS=3 python scripts/dry_run.py
    torchrun --standalone --nproc_per_node=8 scripts/dry_run.py
    python scripts/dry_run.py --export-bench        # the export's bytes and seconds per codec, no steps

It makes a run's checks (the settings, the output folder, the data and the tokenizer), then prints the
resolved config, the depth plan and parameter count, and `dry_run estimated_artifact_bytes:` (the code file the
run would ship, made from train_gpt.py, plus the artifact of Gaussian weights of the model's shapes by the run's export recipe, without GPTQ:
std-based steps make it independent of the weights' scale; trained, heavier-tailed rows pack smaller). A model
that no export can fit in TARGET_BYTES, even at the coarsest steps the export may try, stops here as the run
would stop before its first export try: one `error: TARGET_BYTES: ...` line, exit status 3 (train_gpt's
check_reachable on the Gaussian weights). Then four timed training steps (the first compiles) and
`dry_run step_ms:` with the steps that time projects inside MAX_WALLCLOCK_SECONDS less the calibration reserve,
timed and sized as the run does it (its `gptq_calibration_plan` line), or the time ITERATIONS take.
`--export-bench` instead exports the Gaussian weights with each codec (brotli, zstd) and prints a line per codec
with its bytes and the seconds of each part (quantize, serialize, compress: wall time, the streams in threads).
It trains nothing and writes no folder.
Exit status: 0; 2 on bad input, in one line naming the variable or file at fault; 3 when no export can fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402


def gaussian_state(base: tg.GPT) -> dict[str, torch.Tensor]:
    """The model's tensors with every float one replaced by standard Gaussian noise, on the CPU."""
    return {k: torch.randn(v.shape) if v.is_floating_point() else v.cpu() for k, v in base.state_dict().items()}


def shipped_code_bytes(cfg: tg.Config) -> int:
    """The bytes of the code file the run would ship (SHIP_CODE) made from train_gpt.py, not from this script, which
    train_gpt's own helper would read as the program run."""
    return len(tg.shipped_code(cfg, tg.unpack_code(Path(tg.__file__).read_bytes())))


def estimated_artifact_bytes(cfg: tg.Config, state: dict[str, torch.Tensor], code_bytes: int) -> int:
    """The shipped code's bytes plus the export of these (Gaussian) weights by the run's recipe, without GPTQ."""
    recipe = tg.export_recipe(cfg)
    return code_bytes + len(tg.pack_artifact(tg.quantize_state(state, recipe), recipe))


def export_bench(cfg: tg.Config, rt: tg.Runtime, state: dict[str, torch.Tensor]) -> None:
    """One line per codec: the artifact's bytes and each part's seconds (rounding: no GPTQ without a Hessian)."""
    recipe = tg.export_recipe(cfg)
    rounded = {g: dataclasses.replace(getattr(recipe, g), gptq=False) for g in tg.GROUPS}
    for codec in tg.CODECS:
        recipe, times = dataclasses.replace(recipe, compressor=codec, **rounded), {}
        start = time.perf_counter()
        stored = tg.quantize_state(state, recipe)
        times["quantize"] = time.perf_counter() - start
        blob = tg.pack_artifact(stored, recipe, times)
        parts = " ".join(f"{k}:{v:.1f}s" for k, v in times.items())
        rt.log(f"dry_run export_bench {recipe.describe()} bytes:{len(blob)} {parts}")


def dry_run(cfg: tg.Config, rt: tg.Runtime, out: Path | None = None, bench: bool = False) -> None:
    """In place of train_gpt's run, after its checks; `out`, the run's folder, is neither made nor written."""
    rt.log("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    base, model = tg.build_model(cfg, rt)
    state, code_bytes = gaussian_state(base), shipped_code_bytes(cfg)  # each made once
    # what fit_artifact checks before its first try, with the run's budget (TARGET_BYTES less the shipped code)
    tg.check_reachable(state, tg.export_recipe(cfg), cfg.target_bytes - code_bytes)
    if bench:
        return export_bench(cfg, rt, state)
    estimate = estimated_artifact_bytes(cfg, state, code_bytes)
    verdict = "fits" if estimate <= cfg.target_bytes else "over: the export will coarsen its steps to fit"
    rt.log(f"dry_run estimated_artifact_bytes:{estimate} ({verdict} in TARGET_BYTES={cfg.target_bytes})")
    optimizers = tg.build_optimizers(cfg, base, rt.rank, rt.world_size, fused=rt.device.type == "cuda")
    make_loader = partial(tg.make_train_loader, cfg, rt)
    loader = make_loader()
    plan, times = tg.plan_for(cfg, cfg.repeats), []
    for i in range(4):  # the first step compiles; the next three are timed
        rt.synchronize()
        start = time.perf_counter()
        tg.train_step(model, loader, rt, cfg, plan, optimizers)
        rt.synchronize()
        times.append(time.perf_counter() - start)
        rt.log(f"dry_run step:{i + 1} time:{1000 * times[-1]:.1f}ms" + (" (compile)" if i == 0 else ""))
    step_ms = 1000 * rt.agree_max(sorted(times[1:])[1])
    # the training clock the run would have: its calibration reserve is timed and sized as the run does it
    cfg = dataclasses.replace(cfg, export_reserve_seconds=tg.calibration_batches(cfg, rt, base, make_loader)[1])
    projected = (f"projected_steps:{int(tg.training_seconds(cfg) * 1000 / step_ms)} in MAX_WALLCLOCK_SECONDS="
                 f"{cfg.max_wallclock_seconds:g}" if cfg.max_wallclock_seconds > 0 else
                 f"projected_time:{cfg.iterations * step_ms / 1000:.0f}s for ITERATIONS={cfg.iterations}")
    rt.log(f"dry_run step_ms:{step_ms:.1f} tok/s:{cfg.train_batch_tokens / (step_ms / 1000):.0f} {projected}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-bench", action="store_true",
                        help="export Gaussian weights with each codec (bytes, seconds per part), no timed steps")
    bench = parser.parse_args().export_bench
    # a run's checks, runtime, errors and teardown, with the dry run in place of the run
    return tg.main(lambda cfg, rt, out: dry_run(cfg, rt, out, bench))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as train_gpt.py: no interpreter teardown, which gloo's threads could abort
