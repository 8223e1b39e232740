"""Does a later document boundary move an earlier score in the record's phased LoRA TTT? A CPU check of its own code.

    python scripts/parity/check_ttt_order.py RECORD_SCRIPT [--strict [batches,windows,rows]]

The challenge's rule (CHALLENGE.md) is that the score of token t depends only on the artifact and the tokens before
it. This takes the record's TTT functions as written (eval_val_ttt_phased and what it calls, read from
RECORD_SCRIPT by name), runs them on the CPU with a tiny causal stand-in model over a synthetic stream of short
documents, then turns one token late in the stream into a BOS and runs them again: any earlier target whose loss
moved was scored with knowledge of what follows it. --strict installs REF_TTT_STRICT's three replacements
(ref_hooks.py) first, or those named. The stand-in's own forward is causal, so whatever moves comes from the TTT's order: which
documents share a batch, which are trained on first, where windows are placed. Prints one line per cut point and
exits 1 if any earlier score moved.
"""

import argparse
import ast
import fcntl
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import ref_hooks
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# the record's functions the TTT evaluation runs, taken by name (the record's code is never copied here)
TAKEN = (
    "_build_cu_seqlens", "get_next_multiple_of_n", "_find_docs", "_build_ttt_global_batches", "_init_batch_counter",
    "_claim_next_batch", "_compute_chunk_window", "_accumulate_bpb", "_loss_bpb_from_sums", "_add_to_counter",
    "_init_int64_counter", "_select_ttt_doc_entries", "train_val_ttt_global_sgd_distributed", "eval_val_ttt_phased",
    "BatchedLinearLoRA", "BatchedTTTLoRA",
)  # fmt: skip
VOCAB, DIM, BOS = 64, 16, 1


def load_record(path: Path) -> dict:
    """The record's TTT functions and classes, executed in a namespace of their imports (no CUDA, no Triton)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, SyntaxError) as e:
        raise ValueError(f"RECORD_SCRIPT {path}: not Python: {e}") from None
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in TAKEN]
    missing = set(TAKEN) - {n.name for n in nodes}
    if missing:
        raise ValueError(f"RECORD_SCRIPT {path}: no {', '.join(sorted(missing))}; is it the 2026-04-27 record's?")
    namespace = dict(math=math, os=os, time=time, fcntl=fcntl, random=random, np=np, torch=torch, nn=nn, F=F, dist=dist)
    namespace.update(BOS_ID=BOS, log=lambda *args, **kwargs: None)
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


class StandIn(nn.Module):
    """A tiny causal model with the attributes the record's LoRA reads: a running mean of the embeddings (token t
    sees tokens up to t only), a projection with the LoRA's q adapter, and a head with its head adapter."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.qo_bank = nn.Parameter(0.3 * torch.randn(1, DIM, DIM))
        self.head = nn.Linear(DIM, VOCAB)
        self.blocks = [SimpleNamespace(attn=SimpleNamespace(num_heads=2, num_kv_heads=1))]
        self.looping_active = False

    def per_token_loss(self, x, y, lora=None):
        e = self.tok_emb(x)
        h = torch.cumsum(e, 1) / torch.arange(1, x.size(1) + 1)[:, None]
        h = h @ self.qo_bank[0]
        h = torch.tanh(h if lora is None else h + lora.q_loras[0](h))
        z = self.head(h) if lora is None else self.head(h) + lora.lm_head_lora(h)
        return F.cross_entropy(z.transpose(1, 2), y, reduction="none")

    def forward(self, x, y, cu_seqlens=None, max_seqlen=0):  # the global phases' training loss
        return self.per_token_loss(x, y).mean()


def settings(run_id: str) -> SimpleNamespace:
    """The record's TTT settings (its README: rank 80, weight decay 0.5, beta2 0.99, three phases, global SGD with
    momentum 0.9) at a toy scale: batches of 4 documents, chunks of 8, windows of 32, rank 4."""
    return SimpleNamespace(
        rank=0, world_size=1, seed=0, run_id=run_id, eval_seq_len=32, val_doc_fraction=1.0, ttt_eval_batches="",
        ttt_batch_size=4, ttt_lora_rank=4, ttt_k_lora=True, ttt_mlp_lora=True, ttt_o_lora=True, ttt_optimizer="adam",
        ttt_lora_lr=0.01, ttt_beta1=0.0, ttt_beta2=0.99, ttt_weight_decay=0.5, ttt_chunk_size=8, ttt_eval_seq_len=32,
        ttt_grad_steps=1, phased_ttt_prefix_docs=6, phased_ttt_num_phases=3, global_ttt_lr=0.01,
        global_ttt_momentum=0.9, global_ttt_epochs=1, global_ttt_chunk_tokens=64, global_ttt_batch_seqs=2,
        global_ttt_warmup_start_lr=0.0, global_ttt_warmup_chunks=0, global_ttt_grad_clip=1.0,
        global_ttt_respect_doc_boundaries=True,
    )  # fmt: skip


def scores(namespace: dict, tokens: torch.Tensor, run_id: str) -> dict[int, float]:
    """Every scored target's loss by its position in the stream. The byte sidecar holds each token's position, so
    the record's own gather of target bytes tells which target each scored loss belongs to."""
    recorded: dict[int, float] = {}
    accumulate = namespace["_accumulate_bpb"]

    def recording(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *rest, y_bytes=None):
        accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *rest, y_bytes=y_bytes)
        pos = pos_idx[: x.size(1)].unsqueeze(0)
        end = (chunk_offsets + chunk_lens).unsqueeze(1)
        mask = (chunk_lens.unsqueeze(1) > 0) & (pos >= chunk_offsets.unsqueeze(1)) & (pos < end)
        for b, j in mask.nonzero().tolist():
            recorded[int(y_bytes[b, j])] = float(ptl[b, j])

    namespace["_accumulate_bpb"] = recording
    try:
        torch.manual_seed(0)
        model = StandIn()
        val = SimpleNamespace(
            val_tokens=tokens,
            caseops_enabled=True,
            val_bytes=torch.arange(len(tokens)).int(),
            base_bytes_lut=None,
            has_leading_space_lut=None,
            is_boundary_token_lut=None,
        )
        ttt = lambda x, y, lora: model.per_token_loss(x, y, lora)
        namespace["eval_val_ttt_phased"](settings(run_id), model, torch.device("cpu"), val, ttt)
    finally:
        namespace["_accumulate_bpb"] = accumulate
    return recorded


def stream(seed: int = 0, docs: int = 23) -> torch.Tensor:
    """Documents of 4-119 random tokens; 23 of them leave the last batch of 4 one short, so a BOS in the last
    document fills it."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([[BOS], rng.integers(2, VOCAB, size=rng.integers(4, 120))]) for _ in range(docs)]
    return torch.from_numpy(np.concatenate(parts)).long()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record_script", type=Path, help="the record's train_gpt.py")
    parser.add_argument(
        "--strict",
        nargs="?",
        const=",".join(ref_hooks.STRICT_PARTS),
        default="",
        help="install REF_TTT_STRICT's replacements first (all, or those named)",
    )
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.strict.split(",") if p)
    if set(parts) - set(ref_hooks.STRICT_PARTS):
        print(
            f"check_ttt_order: --strict {args.strict}: expected some of {','.join(ref_hooks.STRICT_PARTS)}",
            file=sys.stderr,
        )
        return 2
    if not args.record_script.is_file():
        print(f"check_ttt_order: RECORD_SCRIPT {args.record_script}: not a file", file=sys.stderr)
        return 2
    try:
        namespace = load_record(args.record_script)
    except (ValueError, SyntaxError) as e:
        print(f"check_ttt_order: {e}", file=sys.stderr)
        return 2
    ref_hooks.strict(namespace, parts)
    torch.set_num_threads(1)
    tokens = stream()
    before = scores(namespace, tokens, "before")
    if not before:  # nothing to move: "0 earlier targets moved" would pass a script that scores nothing
        print(
            f"check_ttt_order: RECORD_SCRIPT {args.record_script}: its eval_val_ttt_phased scored no target; "
            "is it the 2026-04-27 record's?",
            file=sys.stderr,
        )
        return 2
    worst = 0
    starts = (tokens == BOS).nonzero()[:, 0].tolist()
    ends = starts[1:] + [len(tokens)]
    long = [a for a, b in zip(starts, ends) if b - a > 50]
    # 45 tokens into a document: past its first window (32), mid-chunk (8); the last document's fills the last batch
    for cut in (long[0] + 45, long[len(long) // 2] + 45, starts[-1] + 45):
        changed = tokens.clone()
        changed[cut] = BOS
        after = scores(namespace, changed, f"cut{cut}")
        moved = [t for t in before if t < cut and abs(after[t] - before[t]) > 1e-6]
        docs = {int((tokens[: t + 1] == BOS).sum()) for t in moved}
        print(
            f"a BOS at {cut} of {len(tokens)}: {len(moved)} of {cut} earlier targets moved (in {len(docs)} "
            f"documents), at most {max([abs(after[t] - before[t]) for t in moved], default=0.0):.2e} nats"
        )
        worst = max(worst, len(moved))
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
