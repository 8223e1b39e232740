"""Time the parts of one training step on the GPU for the shape the environment configures.

Usage (same variables as train_gpt.py; data is random tokens, so no DATA_PATH is needed):
    NUM_UNIQUE_LAYERS=3 python scripts/profile_step.py --steps 10

Prints the model FLOPs per token, then the median time of each part (forward, backward per
micro-batch; Muon, Adam and zero_grad per step), the step total, tokens/s and MFU against
--peak-tflops (bf16 dense peak you measured on the card).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402


def flops_per_token(cfg: tg.Config) -> float:
    """Training FLOPs per token: 6 x matmul parameters used per token (shared blocks count once per
    use) + causal attention (QK^T and AV: 2 x 2 x T x d per layer forward, halved by the mask, x3)."""
    plan = tg.plan_for(cfg, cfg.repeats)
    model = tg.GPT(cfg)
    per_block = [sum(p.numel() for p in b.parameters() if p.ndim == 2) for b in model.blocks]
    dense = sum(per_block[b] for b in plan.blocks) + cfg.vocab_size * cfg.model_dim
    attention = len(plan.blocks) * 2 * cfg.train_seq_len * cfg.model_dim
    return 6 * dense + 3 * attention


def timed(fn, events: list) -> None:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    events.append((start, end))


def one_step(model, x, y, plan, optimizers, cfg, rt) -> None:
    for _ in range(cfg.micro_steps):
        with rt.autocast():
            loss = model(x, y, plan)
        (loss / cfg.micro_steps).backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def print_kernels(step, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=400))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--trace", type=int, default=0, help="also print the top N CUDA kernels of 2 steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: profile_step.py needs a CUDA GPU")
    cfg = tg.build_config(dict(os.environ))
    rt = tg.Runtime(0, 1, 0, torch.device("cuda", 0))
    torch.cuda.set_device(rt.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    base, model = tg.build_model(cfg, rt)
    optimizers = tg.build_optimizers(cfg, base, 0, 1, fused=True)
    adam, muon = optimizers
    plan = tg.plan_for(cfg, cfg.repeats)
    x = torch.randint(0, cfg.vocab_size, (cfg.micro_batch_seqs, cfg.train_seq_len), device=rt.device)
    y = torch.randint(0, cfg.vocab_size, x.shape, device=rt.device)
    parts = {name: [] for name in ("forward", "backward", "muon", "adam", "zero_grad", "step")}
    import time
    compile_start = time.perf_counter()
    for step in range(args.steps + 3):  # 3 warmup steps (compile)
        step_start = torch.cuda.Event(enable_timing=True)
        step_start.record()
        for _ in range(cfg.micro_steps):
            holder = {}

            def forward():
                with rt.autocast():
                    holder["loss"] = model(x, y, plan)
            timed(forward, parts["forward"])
            timed(lambda: (holder["loss"] / cfg.micro_steps).backward(), parts["backward"])
        timed(muon.step, parts["muon"])
        timed(adam.step, parts["adam"])
        timed(lambda: [o.zero_grad(set_to_none=True) for o in optimizers], parts["zero_grad"])
        step_end = torch.cuda.Event(enable_timing=True)
        step_end.record()
        parts["step"].append((step_start, step_end))
        if step < 3:
            torch.cuda.synchronize()
            if step == 2:
                print(f"compile+3 warmup steps: {time.perf_counter() - compile_start:.1f} s")
            for name in parts:
                parts[name].clear()
    torch.cuda.synchronize()
    if args.trace:
        print_kernels(lambda: one_step(model, x, y, plan, optimizers, cfg, rt), args.trace)
    fpt = flops_per_token(cfg)
    print(f"shape: layers={cfg.num_layers} unique={len(base.blocks)} dim={cfg.model_dim} vocab={cfg.vocab_size} "
          f"seq={cfg.train_seq_len} batch_tokens={cfg.train_batch_tokens} micro_steps={cfg.micro_steps}")
    print(f"flops_per_token: {fpt / 1e6:.1f} MFLOP")
    for name, events in parts.items():
        ms = [s.elapsed_time(e) for s, e in events]
        per = "per micro-batch" if name in ("forward", "backward") else "per step"
        print(f"{name:>10}: {statistics.median(ms):8.2f} ms {per}")
    step_ms = statistics.median(s.elapsed_time(e) for s, e in parts["step"])
    tokens_per_s = cfg.train_batch_tokens / (step_ms / 1000)
    print(f"step: {step_ms:.1f} ms  tokens/s: {tokens_per_s / 1e6:.3f}M  "
          f"MFU: {100 * fpt * tokens_per_s / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:.0f} TFLOP/s")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
