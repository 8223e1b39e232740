"""The golf bench's knobs for the 2026-04-27 record's script, called from the lines that patch_reference.py adds.

Parity only (docs/parity.md, "How the reference runs on the golf bench"). Every knob is off unless its variable is
set, so the patched script without them behaves as the record's own. run_ref.sh sets the fair pairs' values.

  REF_LOADER=shuffled     train on ours' windows (train_gpt.py's ShuffledLoader: the same seed gives the same
                          windows in the same order), each window and each document in it its own segment; the
                          record reads its shard front to back, which on the bench's books puts one or two books in
                          a step. Needs REF_OURS_SCRIPT, the path of ours' train_gpt.py.
  REF_CU_BUCKETS=64       warm the compiled model only for these cu_seqlens lengths (comma-separated); the bench's
                          batches always give 64 entries, and each other length costs two cold compiles.
  REF_RESET_MOMENTUM=1    after the warmup, zero the sharded Muon's momentum as well: the record restores the
                          optimizers' state dicts, which under torchrun do not hold it, so its warmup trained it.
  REF_SKIP_LAST_VAL=1     skip the score of the raw weights at the last step (only the averaged weights' counts).
  REF_EVAL_QUANTIZED=1    with TTT_EVAL_ONLY=1, score the loaded artifact before the test-time training.
  REF_TTT_EAGER=1         run the LoRA TTT's forward uncompiled and skip its compile warmup.
  REF_TTT_STRICT=1        TTT in stream order, so that no score depends on where a later document boundary falls:
                          batches of consecutive documents; each chunk's context window placed where it would be
                          if the chunk were whole; the stream's last, smaller batch starts from the first rows of
                          the adapters a full batch would use. The record sorts documents by length, places a
                          document's last window from its end, and gives a smaller batch fresh random adapters
                          drawn in a shape that depends on how many documents follow.
"""

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

REF: dict = {}  # the reference module's globals, from install()


def flag(name: str) -> bool:
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def install(namespace: dict) -> None:
    """Called once at the end of the reference module: swap in the functions and classes the knobs replace."""
    REF.clear()
    REF.update(namespace=namespace)
    loader = os.environ.get("REF_LOADER", "record")
    if loader not in ("record", "shuffled"):
        raise ValueError(f"REF_LOADER={loader!r}: expected record or shuffled")
    if loader == "shuffled":
        namespace["DocumentPackingLoader"] = ShuffledWindows
    if flag("REF_TTT_STRICT"):
        strict(namespace)


STRICT_PARTS = ("batches", "windows", "rows")


def strict(namespace: dict, parts: tuple = STRICT_PARTS) -> None:
    """REF_TTT_STRICT's three replacements, or some of them (check_ttt_order.py checks them on the CPU)."""
    if "batches" in parts:
        namespace["_build_ttt_global_batches"] = stream_order_batches
    if "windows" in parts:
        namespace["_compute_chunk_window"] = whole_chunk_window
    if "rows" in parts:
        namespace["BatchedTTTLoRA"] = rows_of_the_full_batch(namespace["BatchedTTTLoRA"])


def warmup_cu_buckets(buckets: tuple) -> tuple:
    text = os.environ.get("REF_CU_BUCKETS", "")
    if not text:
        return buckets
    if not all(b.isdigit() and int(b) > 0 for b in text.split(",")):
        raise ValueError(f"REF_CU_BUCKETS={text!r}: expected lengths such as 64 or 64,128")
    return tuple(int(b) for b in text.split(","))


def after_warmup_restore(optimizers) -> None:
    muon = optimizers.optimizer_muon
    if flag("REF_RESET_MOMENTUM") and getattr(muon, "_built", False):
        buffers = [meta["shard_mom"] for meta in muon._bank_meta]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b.float()) for b in buffers]))
        for b in buffers:
            b.zero_()
        log = REF.get("namespace", {}).get("log", print)
        log(f"ref_hooks: zeroed the sharded Muon momentum the warmup left (norm {norm.item():.3f})")


def should_validate(validate: bool, last_step: bool) -> bool:
    return validate and not (last_step and flag("REF_SKIP_LAST_VAL"))


def ttt_warmup_sizes(sizes: list) -> list:
    return [] if flag("REF_TTT_EAGER") else sizes


def ttt_forward(compiled, eager):
    return eager if flag("REF_TTT_EAGER") else compiled


def score_loaded(h, device, val_data, model, ttt_eval_only: bool) -> None:
    if not (ttt_eval_only and flag("REF_EVAL_QUANTIZED")):
        return
    ns = REF["namespace"]
    model.looping_active = h.num_loops > 0
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    logits = torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
    ns["timed_eval"]("diagnostic quantized", ns["eval_val"], h, device, val_data, compiled, logits)
    torch._dynamo.reset()


def load_ours():
    path = os.environ.get("REF_OURS_SCRIPT", "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"REF_LOADER=shuffled needs REF_OURS_SCRIPT, the path of ours' train_gpt.py (got {path!r})"
        )
    spec = importlib.util.spec_from_file_location("ours_train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ShuffledWindows:
    """REF_LOADER=shuffled: the record's loader interface (x, y, cu_seqlens, max_seqlen) over ours' windows. Like
    the record's own loader, it prepares the next batch in a thread while the GPU works and copies from pinned
    memory (a copy from pageable memory can wait for the GPU)."""

    def __init__(self, h, device, cu_bucket_size=64):
        if cu_bucket_size != 64:
            raise ValueError(f"REF_LOADER=shuffled: ours' segments pad cu_seqlens to 64 entries, not {cu_bucket_size}")
        ours = load_ours()
        if REF["namespace"].get("BOS_ID") is None:  # the record's loader sets its global BOS_ID; the model reads it
            REF["namespace"]["BOS_ID"] = ours.BOS_ID  # the id ours' segments split at
        self.device, self.seq_len = device, h.train_seq_len
        self.seqs = h.train_batch_tokens // (h.world_size * h.grad_accum_steps * h.train_seq_len)
        paths = ours.find_shards(h.datasets_dir, "train")
        cpu = torch.device("cpu")
        self.windows = ours.ShuffledLoader(paths, h.rank, h.world_size, self.seqs, h.train_seq_len, cpu, h.seed)
        self.segments = ours.varlen_segments  # ours' DOC_MASK=1 segments: each window, each BOS; padded to 64
        self.pool, self.pending = ThreadPoolExecutor(1), None

    def prepare(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.windows.next_batch()
        batch = (x.reshape(1, -1), y.reshape(1, -1), self.segments(x))
        return tuple(t.pin_memory() for t in batch) if self.device.type == "cuda" else batch

    def next_batch(self, global_tokens, grad_accum_steps):
        if self.seqs * self.seq_len != global_tokens // (grad_accum_steps * self.windows.world_size):
            raise ValueError(
                f"REF_LOADER=shuffled: a batch of {global_tokens} tokens is not {self.seqs} windows a rank"
            )
        batch = (self.pending or self.pool.submit(self.prepare)).result()
        self.pending = self.pool.submit(self.prepare)
        return (*(t.to(self.device, non_blocking=True) for t in batch), self.seq_len)


def stream_order_batches(doc_entries, h, ascending=False):
    """REF_TTT_STRICT: batches of ttt_batch_size consecutive documents, in stream order."""
    size = h.ttt_batch_size
    return list(enumerate(doc_entries[i : i + size] for i in range(0, len(doc_entries), size)))


def whole_chunk_window(ci, pred_len, num_chunks, chunk_size, eval_seq_len):
    """REF_TTT_STRICT: chunk ci of a document with pred_len targets, as (window start, window length, the chunk's
    offset in the window, the chunk's length). The window ends where chunk ci would end if whole, whatever pred_len."""
    chunk_start = ci * chunk_size
    chunk_end = min(pred_len, chunk_start + chunk_size)
    win_start = max(0, chunk_start + chunk_size - eval_seq_len)
    return win_start, chunk_end - win_start, chunk_start - win_start, chunk_end - chunk_start


def rows_of_the_full_batch(lora_class):
    """REF_TTT_STRICT: the record's batched LoRA, except that one built for fewer documents than the last full-size one
    (the stream's last batch) takes that one's rows as reset() leaves them, as those documents would have in a full
    batch. Fresh random rows would be drawn in a shape set by how many documents follow them."""

    class FirstRowsLoRA(lora_class):
        full = None

        def __init__(self, bsz, model, rank, **kwargs):
            super().__init__(bsz, model, rank, **kwargs)
            full = FirstRowsLoRA.full
            if full is None or bsz >= full.bsz:
                FirstRowsLoRA.full = self
                return
            full.reset()
            with torch.no_grad():
                for mine, theirs in zip(self.modules(), full.modules()):
                    for name in ("A", "B"):
                        if isinstance(getattr(mine, name, None), torch.nn.Parameter):
                            getattr(mine, name).copy_(getattr(theirs, name)[:bsz])

    return FirstRowsLoRA
