"""Where a training step's time goes, on the GPU, for the shape the environment configures.

Usage (same variables as train_gpt.py; the tokens are random, so no DATA_PATH is needed):
    python scripts/profile_step.py                      # the default shape at 1 and at 3 core passes
    python scripts/profile_step.py --passes 3 --steps 8 --peak-tflops 790 --top 25
    DOC_MASK=1 python scripts/profile_step.py --doc-tokens 900   # documents as long as FineWeb's pages
    torchrun --standalone --nproc_per_node=2 scripts/profile_step.py   # several GPUs: what the all-reduce costs

The random tokens hold no BOS unless --doc-tokens asks for documents: every row is then one document, as in
the bench's books, and DOC_MASK=1 costs its most. Causal windows (DOC_MASK=0) cost the same either way.

For each pass count: the training FLOPs per token (counted as printed), the median time of the
step's parts measured with CUDA events (forward and backward per micro-batch; Muon, Adam,
zero_grad per step), tokens/s and MFU against --peak-tflops (the bf16 matmul rate you measured on
the card), then a profiler pass that sorts every CUDA kernel of two steps into attention, matmul,
norms/elementwise (Inductor's Triton kernels), the loss head, the optimizers and communication. With --top N it
lists the N costliest kernels, then what the list leaves out: how many kernels, their time and launches, by part.

Under torchrun each rank steps as train_gpt.py's training does: DDP around the model, the gradients all-reduced in
the last micro-step's backward, Muon's updates shared by its own all-reduce; the global batch is split over the
ranks. The step is then timed a second time with DDP's gradient all-reduce left out (every micro-step as the ones
before the last), and the difference is printed: what the gradient all-reduce adds to a step where it does not
overlap the backward. Rank 0 prints. On the CPU (gloo) the script runs for checking only, without the profiler.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402

# Kernel names by part, first match wins (cuDNN / flash / efficient attention, cuBLAS and CUTLASS matmuls).
KERNEL_PARTS = [
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa|flex", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|sm90_|ampere_|wgmma", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("optimizer", re.compile(r"multi_tensor|foreach|adam", re.I)),
    ("norms/elementwise", re.compile(r"triton|elementwise|vectorized|reduce|copy|fill|cat", re.I)),
]


def flops_per_token(cfg: tg.Config, passes: int) -> tuple[float, str]:
    """Training FLOPs per token and how they were counted: 6 x matmul weights used per token (a shared block counts
    once per use; the tied head once) + causal attention, 6 x layers x seq x width (QK^T and AV, 2 x 2 x T x d per
    layer forward, halved by the mask, x3 for forward and backward)."""
    plan = tg.plan_for(cfg, passes)
    model = tg.GPT(cfg)
    per_block = [sum(p.numel() for p in b.parameters() if p.ndim == 2) for b in model.blocks]
    blocks = sum(per_block[b] for b in plan.blocks)
    head = cfg.vocab_size * cfg.model_dim
    attention = 6 * len(plan.blocks) * cfg.train_seq_len * cfg.model_dim
    total = 6 * (blocks + head) + attention
    how = (f"6 x ({blocks / 1e6:.2f}M block + {head / 1e6:.2f}M head weights) + attention 6 x {len(plan.blocks)} "
           f"layers x {cfg.train_seq_len} x {cfg.model_dim} = {total / 1e6:.1f} MFLOP/token")
    return total, how


FINEWEB_DOC_TOKENS = 900.0  # the FineWeb sample at sp8192 has ~2.3 BOS per 2,048-token window (docs/perf.md)


def random_batch(cfg: tg.Config, doc_tokens: float, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of random inputs and targets. No token is a BOS except, with doc_tokens > 0, each position
    with probability 1 / doc_tokens: documents of doc_tokens tokens on average, placed at random."""
    shape = (cfg.micro_batch_seqs, cfg.train_seq_len)
    x = torch.randint(tg.BOS_ID + 1, cfg.vocab_size, shape, device=device, generator=generator)
    if doc_tokens > 0:
        starts = torch.rand(shape, device=device, generator=generator) < 1 / doc_tokens
        x = x.masked_fill(starts, tg.BOS_ID)
    return x, torch.randint(0, cfg.vocab_size, shape, device=device, generator=generator)


class HostEvent:
    """torch.cuda.Event's timing on the CPU, where the work is done when the call returns."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        return 1000 * (end.time - self.time)


def new_event(rt: tg.Runtime):
    return torch.cuda.Event(enable_timing=True) if rt.device.type == "cuda" else HostEvent()


def timed(fn, events: list, rt: tg.Runtime) -> None:
    start, end = new_event(rt), new_event(rt)
    start.record()
    fn()
    end.record()
    events.append((start, end))


def set_sync(model, rt: tg.Runtime, sync: bool) -> None:
    """Whether DDP all-reduces the gradients in the coming backward (train_gpt.train_step: the last micro-step's)."""
    if rt.distributed:
        model.require_backward_grad_sync = sync


def measure_parts(model, x, y, plan, optimizers, cfg, rt, steps: int, sync: bool = True) -> dict[str, float]:
    """Median milliseconds of each part over `steps` steps, after 3 steps that compile and warm up. sync=False leaves
    out DDP's gradient all-reduce (several ranks)."""
    adam, muon = optimizers
    parts = {name: [] for name in ("forward", "backward", "muon", "adam", "zero_grad", "step")}
    for step in range(steps + 3):
        step_start = new_event(rt)
        step_start.record()
        for micro in range(cfg.micro_steps):
            holder = {}
            set_sync(model, rt, sync and micro == cfg.micro_steps - 1)

            def forward():
                with rt.autocast():
                    holder["loss"] = model(x, y, plan)

            timed(forward, parts["forward"], rt)
            timed(lambda: (holder["loss"] / cfg.micro_steps).backward(), parts["backward"], rt)
        timed(muon.step, parts["muon"], rt)
        timed(adam.step, parts["adam"], rt)
        timed(lambda: [o.zero_grad(set_to_none=True) for o in optimizers], parts["zero_grad"], rt)
        step_end = new_event(rt)
        step_end.record()
        parts["step"].append((step_start, step_end))
        if step < 3:
            rt.synchronize()
            for events in parts.values():
                events.clear()
    rt.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in events) for name, events in parts.items()}


def kernel_breakdown(model, base, x, y, plan, optimizers, cfg, rt) -> tuple[dict[str, float], list]:
    """CUDA milliseconds per step of each part, from the profiler's kernels over two steps (the loss head's kernels
    are those launched inside its compiled function: a record_function range around it), and every kernel as
    (milliseconds per step, part, name, launches per step), costliest first."""
    from torch.profiler import ProfilerActivity, profile, record_function

    head_loss = base.head_loss

    def labelled_head(*args):
        with record_function("loss_head"):
            return head_loss(*args)

    base.head_loss = labelled_head

    def step():
        for micro in range(cfg.micro_steps):
            set_sync(model, rt, micro == cfg.micro_steps - 1)
            with rt.autocast():
                loss = model(x, y, plan)
            (loss / cfg.micro_steps).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    base.head_loss = head_loss
    totals = {name: 0.0 for name, _ in KERNEL_PARTS}
    totals["other"] = 0.0
    head_us, kernels = 0.0, []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if event.key == "loss_head":
            head_us = device_us
            continue
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        part = next((name for name, pattern in KERNEL_PARTS if pattern.search(event.key)), "other")
        totals[part] += device_us
        kernels.append((device_us / 2 / 1000, part, event.key, event.count / 2))
    totals["loss head (forward, within the above)"] = head_us
    return {name: us / 2 / 1000 for name, us in totals.items()}, sorted(kernels, reverse=True)


def beyond_the_top(kernels: list, top: int, kernel_ms: float) -> list[str]:
    """What the list of the `top` costliest kernels leaves out: how many distinct kernels, their time and launches a
    step, the costliest of them, and their time by part (a long tail of small kernels shows here, not in the list)."""
    rest = kernels[top:]
    if not top or not rest:
        return []
    ms, launches = sum(k[0] for k in rest), sum(k[3] for k in rest)
    lines = [(f"  the other {len(rest)} kernels: {ms:.1f} ms ({100 * ms / kernel_ms:.1f}%), {launches:.0f} launches "
              f"a step, the costliest {rest[0][0]:.2f} ms")]
    for part in dict.fromkeys(k[1] for k in rest):
        in_part = [k for k in rest if k[1] == part]
        lines.append(f"    {part:>17}: {sum(k[0] for k in in_part):7.1f} ms in {len(in_part)} kernels, "
                     f"{sum(k[3] for k in in_part):.0f} launches")
    return lines


def attention_backends(cfg: tg.Config, device, doc_tokens: float) -> None:
    """Forward + backward of one layer's attention at the run's shape (a micro-batch of TRAIN_SEQ_LEN rows; GQA; bf16),
    through each kernel PyTorch offers: SDPA's cuDNN, flash and memory-efficient backends, and flex_attention causal
    and with a document mask over random_batch's documents of `doc_tokens` tokens on average."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, H, KV = cfg.micro_batch_seqs, cfg.train_seq_len, cfg.num_heads, cfg.num_kv_heads
    D = cfg.model_dim // H
    q = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, KV, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cotangent = torch.randn_like(q)
    ids, _ = random_batch(cfg, doc_tokens, device)
    doc = torch.cumsum(ids == tg.BOS_ID, 1)
    flex = torch.compile(flex_attention, dynamic=False)
    causal = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T, device=device)
    documents = create_block_mask(lambda b, h, i, j: (i >= j) & (doc[b, i] == doc[b, j]), B, None, T, T, device=device)

    def sdpa(backend):  # None: PyTorch's own choice (SDPBackend is not iterable in every torch)
        def run():
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            y.backward(cotangent)
        return run

    def flex_run(mask):
        def run():
            flex(q, k, v, block_mask=mask, enable_gqa=KV != H).backward(cotangent)
        return run

    cases = [("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION)),
             ("sdpa efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)), ("sdpa (PyTorch's choice)", sdpa(None)),
             ("flex causal", flex_run(causal)), (f"flex documents of ~{doc_tokens:g}", flex_run(documents))]
    flops = 4 * B * H * T * T * D / 2 * 3.5  # QK^T and AV, causal half, forward + backward (2.5x)
    print(f"\n== attention, fwd+bwd of one layer: B={B} T={T} H={H} KV={KV} D={D} bf16")
    for name, run in cases:
        try:
            ms = triton.testing.do_bench(run, warmup=200, rep=600, return_mode="median")
            print(f"{name:>24}: {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
        except Exception as exc:  # a backend that does not support this shape or GPU
            print(f"{name:>24}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per pass count (after 3 warmup steps)")
    parser.add_argument("--passes", default="", help="core passes to profile, e.g. '1,3' (default: 1 and R)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the card's measured bf16 matmul rate")
    parser.add_argument("--no-kernels", action="store_true", help="skip the profiler pass")
    parser.add_argument("--attention", action="store_true", help="also time each attention kernel at this shape")
    parser.add_argument("--top", type=int, default=0, help="list the N costliest kernels a step (name, part, ms)")
    parser.add_argument("--doc-tokens", type=float, default=0.0,
                        help="mean document length of the random tokens (a BOS in 1 of N places; 0: no BOS, one "
                             f"document a row, as in books; ~{FINEWEB_DOC_TOKENS:g}: FineWeb's pages at sp8192); "
                             "--attention's document mask uses it too (FineWeb's when 0)")
    args = parser.parse_args()
    try:
        tg.require(args.steps >= 1, f"--steps {args.steps}: give at least 1 timed step")
        tg.require(args.peak_tflops > 0, f"--peak-tflops {args.peak_tflops:g}: give the card's rate, above 0")
        tg.require(args.top >= 0, f"--top {args.top}: give 0 (no list) or the number of kernels to list")
        tg.require(args.doc_tokens == 0 or args.doc_tokens >= 1,
                   f"--doc-tokens {args.doc_tokens:g}: give 0 (no BOS) or a mean document length of at least 1")
        tg.require(re.fullmatch(r"(\d+,)*\d+|", args.passes) is not None,
                   f"--passes {args.passes}: give core pass counts separated by commas, e.g. 1,3")
        tg.require(not args.attention or torch.cuda.is_available(),
                   "--attention times the GPU's attention kernels: it needs a CUDA GPU")
        cfg = tg.build_config(dict(os.environ), int(os.environ.get("WORLD_SIZE", "1")))
        passes = [int(p) for p in args.passes.split(",")] if args.passes else sorted({1, cfg.repeats})
        tg.require(all(1 <= n <= cfg.repeats for n in passes),
                   f"--passes {args.passes}: each from 1 to {cfg.repeats}, the core passes of this shape")
        rt = tg.setup_runtime()  # torchrun's ranks, or one
    except tg.UserError as error:  # every rank finds the same: rank 0 prints it, each gives it to torchrun's summary
        rank = int(os.environ.get("RANK", "0"))
        sys.exit(tg.report(error, rank, echo=rank == 0))
    cuda = rt.device.type == "cuda"
    base, model = tg.build_model(cfg, rt)
    optimizers = tg.build_optimizers(cfg, base, rt.rank, rt.world_size, fused=cuda)
    torch.manual_seed(cfg.seed + rt.rank)  # each rank its own tokens
    x, y = random_batch(cfg, args.doc_tokens, rt.device)
    rt.log(f"shape: layers={cfg.num_layers} unique={len(base.blocks)} dim={cfg.model_dim} vocab={cfg.vocab_size} "
           f"seq={cfg.train_seq_len} batch_tokens={cfg.train_batch_tokens} ranks={rt.world_size} "
           f"micro_steps={cfg.micro_steps} attention={tg.attention_backend_name(cfg, rt.device.type)} "
           f"gpu={torch.cuda.get_device_name() if cuda else 'none (CPU: for checking the script, not for timings)'} "
           f"bos_per_row={(x == tg.BOS_ID).sum().item() / x.size(0):.2f}")
    for n in passes:
        plan = tg.plan_for(cfg, n)
        start = time.perf_counter()
        parts = measure_parts(model, x, y, plan, optimizers, cfg, rt, args.steps)
        fpt, how = flops_per_token(cfg, n)
        tokens_per_s = cfg.train_batch_tokens / rt.world_size / (parts["step"] / 1000)  # per rank
        mfu = 100 * fpt * tokens_per_s / (args.peak_tflops * 1e12)
        rt.log(f"\n== {n} core pass(es), {len(plan.layers)} layers ({time.perf_counter() - start:.0f} s with compile)")
        rt.log(f"flops: {how}")
        for name, ms in parts.items():
            per = "per micro-batch" if name in ("forward", "backward") else "per step"
            rt.log(f"{name:>10}: {ms:8.2f} ms {per}")
        in_all = f" ({tokens_per_s * rt.world_size / 1e6:.3f}M over {rt.world_size} ranks)" if rt.distributed else ""
        rt.log(f"step: {parts['step']:.1f} ms  tokens/s: {tokens_per_s / 1e6:.3f}M{in_all}  "
               f"MFU: {mfu:.1f}% of {args.peak_tflops:.0f} TFLOP/s")
        if rt.distributed:
            alone = measure_parts(model, x, y, plan, optimizers, cfg, rt, args.steps, sync=False)["step"]
            added = parts["step"] - alone
            rt.log(f"gradient all-reduce: step {parts['step']:.1f} ms with it, {alone:.1f} ms without: "
                   f"{added:+.1f} ms ({100 * added / parts['step']:+.1f}% of the step)")
        if not args.no_kernels and cuda:
            breakdown, kernels = kernel_breakdown(model, base, x, y, plan, optimizers, cfg, rt)
            kernel_ms = sum(v for k, v in breakdown.items() if not k.startswith("loss head"))
            rt.log(f"CUDA kernel time per step: {kernel_ms:.1f} ms (step wall {parts['step']:.1f} ms)")
            for name, ms in breakdown.items():
                rt.log(f"  {name:>40}: {ms:8.1f} ms  {100 * ms / kernel_ms:5.1f}%")
            for ms, part, name, _ in kernels[: args.top]:
                rt.log(f"  {ms:7.2f} ms {100 * ms / kernel_ms:5.1f}% {part:>17}  {name[:110]}")
            for line in beyond_the_top(kernels, args.top, kernel_ms):
                rt.log(line)
    if cuda:
        rt.log(f"\npeak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.attention and rt.main:
        attention_backends(cfg, rt.device, args.doc_tokens or FINEWEB_DOC_TOKENS)
    if rt.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
