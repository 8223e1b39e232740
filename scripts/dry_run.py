"""Dry run of train_gpt.py: what a run with this environment would decide up front, and a few timed steps.

Usage (the same variables and launcher as the run it stands for):
    NUM_UNIQUE_LAYERS=3 python scripts/dry_run.py
    torchrun --standalone --nproc_per_node=8 scripts/dry_run.py

It makes a run's checks (the settings, the output folder, the data and the tokenizer), then prints the
resolved config, the depth plan and parameter count, `dry_run estimated_artifact_bytes:` (train_gpt.py's
bytes plus the artifact of Gaussian weights of the model's shapes by the run's export recipe, without GPTQ),
four timed training steps (the first compiles) and `dry_run step_ms:` with the steps that time projects
inside MAX_WALLCLOCK_SECONDS (or the time ITERATIONS take). It trains nothing and writes no folder.
Exit status: 0; 2 on bad input, in one line naming the variable or file at fault.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402


def estimated_artifact_bytes(cfg: tg.Config, base: tg.GPT) -> int:
    """train_gpt.py's bytes (the shipped code, not this script's) plus the export of Gaussian weights: std-based steps
    make it independent of the weights' scale; heavier-tailed trained rows pack smaller."""
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v.cpu() for k, v in base.state_dict().items()}
    recipe = tg.export_recipe(cfg)
    return Path(tg.__file__).stat().st_size + len(tg.pack_artifact(tg.quantize_state(state, recipe), recipe))


def dry_run(cfg: tg.Config, rt: tg.Runtime, out: Path | None = None) -> None:
    """In place of train_gpt's run, after its checks; `out`, the run's folder, is neither made nor written."""
    rt.log("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    base, model = tg.build_model(cfg, rt)
    estimate = estimated_artifact_bytes(cfg, base)
    verdict = "fits" if estimate <= cfg.target_bytes else "over: the export will coarsen its steps to fit"
    rt.log(f"dry_run estimated_artifact_bytes:{estimate} ({verdict} in TARGET_BYTES={cfg.target_bytes})")
    optimizers = tg.build_optimizers(cfg, base, rt.rank, rt.world_size, fused=rt.device.type == "cuda")
    loader = tg.make_train_loader(cfg, tg.find_shards(cfg.data_path, "train"), rt.rank, rt.world_size, rt.device)
    plan, times = tg.plan_for(cfg, cfg.repeats), []
    for i in range(4):  # the first step compiles; the next three are timed
        rt.synchronize()
        start = time.perf_counter()
        tg.train_step(model, loader, rt, cfg, plan, optimizers)
        rt.synchronize()
        times.append(time.perf_counter() - start)
        rt.log(f"dry_run step:{i + 1} time:{1000 * times[-1]:.1f}ms" + (" (compile)" if i == 0 else ""))
    step_ms = 1000 * rt.agree_max(sorted(times[1:])[1])
    projected = (f"projected_steps:{int(tg.training_seconds(cfg) * 1000 / step_ms)} in MAX_WALLCLOCK_SECONDS="
                 f"{cfg.max_wallclock_seconds:g}" if cfg.max_wallclock_seconds > 0 else
                 f"projected_time:{cfg.iterations * step_ms / 1000:.0f}s for ITERATIONS={cfg.iterations}")
    rt.log(f"dry_run step_ms:{step_ms:.1f} tok/s:{cfg.train_batch_tokens / (step_ms / 1000):.0f} {projected}")


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    return tg.main(dry_run)  # a run's checks, runtime, errors and teardown, with dry_run in place of the run


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as train_gpt.py: no interpreter teardown, which gloo's threads could abort
