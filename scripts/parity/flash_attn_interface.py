"""A stand-in for FlashAttention 3's `flash_attn_interface`, for running a record script on a GPU that lacks FA3.

Parity only (docs/parity.md): the reference script imports `flash_attn_func` (dense causal attention over
[B, T, H, D]) and `flash_attn_varlen_func` (causal attention within documents packed into one row, their starts in
`cu_seqlens`). The first runs on PyTorch's SDPA. The second runs on flex attention with a document block mask, the
kind of kernel ours uses with DOC_MASK=1, so the two scripts' attention costs compare.

FA_SHIM_MASK chooses how the block mask is built:
  blocks (default)  from each 128-token block's first and last document: a [blocks, blocks] table, which costs what
                    FA3 pays for its document boundaries (nothing like an N x N pass);
  full              create_block_mask over every pair of the N packed positions (what the first pairs paid).
Both give the same mask. FA_SHIM_COMPILE=0 runs flex attention uncompiled (the CPU tests).
"""

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BLOCK = 128  # flex attention's block size
MASK_MODES = ("blocks", "full")


def mask_mode() -> str:
    mode = os.environ.get("FA_SHIM_MASK", "blocks")
    if mode not in MASK_MODES:
        raise ValueError(f"FA_SHIM_MASK={mode!r}: expected one of {', '.join(MASK_MODES)}")
    return mode


def flash_attn_func(q, k, v, causal=True, **unused):
    """Dense attention over [B, T, H, D] (grouped K/V heads allowed) on SDPA."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2).contiguous()


def document_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """The segment each of the n packed positions belongs to; cu_seqlens may be padded with n (empty segments)."""
    positions = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True) - 1


def causal_document_mod(doc: torch.Tensor):
    def mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    return mod


def block_tables(doc: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[q block, kv block] tables: the blocks that need the mask applied (partial) and those wholly visible (full).
    Segments are contiguous, so kv block j <= i reaches q block i iff j's last segment is i's first or later, and is
    wholly visible iff j < i and both blocks lie in one segment."""
    starts = torch.arange(0, n, BLOCK, device=doc.device)
    first, last = doc[starts], doc[torch.clamp(starts + BLOCK, max=n) - 1]
    i, j = starts[:, None] // BLOCK, starts[None, :] // BLOCK
    needed = (j <= i) & (last[None, :] >= first[:, None])
    full = (j < i) & (first[None, :] == last[:, None])
    return needed & ~full, full


def indices(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [q block, kv block] boolean table as BlockMask's per-row counts and kv block indices (listed first)."""
    counts = table.sum(-1, dtype=torch.int32)
    order = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


@torch.library.custom_op("parity_shim::document_blocks", mutates_args=())
def document_blocks(cu_seqlens: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The segment of each position, then BlockMask's eight tables (kv side partial and full, then the q side the
    backward reads), in an op of its own so that a compiled graph receives them as realized buffers: built from
    traced ops inside the record's compiled evaluation (no backward), Inductor left them unrealized and failed to
    lower flex attention ("convert FlexibleLayout to FixedLayout first", H100, torch 2.11)."""
    doc = document_ids(cu_seqlens, n).to(torch.int32)
    partial, full = block_tables(doc, n)
    return [doc, *indices(partial), *indices(full), *indices(partial.mT), *indices(full.mT)]


@document_blocks.register_fake
def _(cu_seqlens, n):
    blocks = -(-n // BLOCK)
    tables = [cu_seqlens.new_empty((1, 1, blocks) + (blocks,) * (i % 2), dtype=torch.int32) for i in range(8)]
    return [cu_seqlens.new_empty((n,), dtype=torch.int32), *tables]


def document_block_mask(cu_seqlens: torch.Tensor, n: int, mode: str) -> BlockMask:
    if mode == "full":
        mod = causal_document_mod(document_ids(cu_seqlens, n))
        return create_block_mask(mod, None, None, n, n, device=cu_seqlens.device, BLOCK_SIZE=BLOCK)
    doc, *tables = torch.ops.parity_shim.document_blocks(cu_seqlens, n)
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    names += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    return BlockMask(
        seq_lengths=(n, n), BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=causal_document_mod(doc), **dict(zip(names, tables))
    )


_compiled_flex = None


def flex(q, k, v, block_mask):
    global _compiled_flex
    if os.environ.get("FA_SHIM_COMPILE", "1") == "0" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, causal=True, window_size=(-1, -1), **unused
):
    """Causal attention within each segment of one packed row: q [N, H, D], k and v [N, H_kv, D] -> [N, H, D]."""
    if not causal or tuple(window_size) != (-1, -1):
        raise NotImplementedError("the stand-in covers causal self-attention without a window only")
    n = q.size(0)
    block_mask = document_block_mask(cu_seqlens_q, n, mask_mode())
    y = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask)
    return y[0].transpose(0, 1).contiguous()
