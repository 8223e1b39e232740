"""Preflight of a rented GPU box: what a paid run needs, checked in under two minutes, before any training.

Usage (with the variables of the run it stands for, from the folder the run starts in):
    python3 scripts/preflight.py                     # the default run on this box's GPUs
    NUM_UNIQUE_LAYERS=3 python3 scripts/preflight.py --gpus 8 --warm-compile

One line per check, `PASS`, `WARN`, `FAIL` or `SKIP` (could not run: an earlier check failed), its name and
its figure, then a summary line. The checks:
  gpus          torch.cuda: how many GPUs, which kind, memory already in use (FAIL: none, or fewer than --gpus;
                WARN: not H100s, the kind the 10-minute track is timed on, or memory held by another process)
  config        build_config (train_gpt.py's own parser) on this environment for that many processes: a
                misspelt variable or an impossible setting is a FAIL with the config's own message
  nccl          a 256 MB all-reduce over every GPU, one process per GPU, timed: bus bandwidth in GB/s
                (nccl-tests' definition: algorithm bandwidth x 2(n-1)/n). NVLink multicast stays off
                (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, set here for the workers)
  fa3           FlashAttention 3 (`flash_attn_interface`) imports (else WARN: the run falls back to SDPA);
  fa3 numerics  then its flash_attn_func, called as train_gpt.py calls it (bf16, (B, T, H, D), causal, GQA),
                against PyTorch SDPA on a random batch of the run's shapes (B = MICRO_BATCH_TOKENS' sequences
                per GPU, T = TRAIN_SEQ_LEN, NUM_HEADS / NUM_KV_HEADS, head dim): the relative error of the
                output and of the gradients of q, k and v against a float32 reference must be at most twice
                SDPA's own in bf16, plus 1e-3 (FlashAttention's own tests' rule)
  doc mask numerics  (DOC_MASK=1 only; a GPU) the run's document-masked attention, made as its compiled
                blocks make it (FA3's varlen kernel when it imports, else flex_attention under a compiled block
                mask), on up to 4 sequences of the run's shapes with a BOS every ~400 tokens, against SDPA with
                the boolean mask of the same documents: output and gradients, the fa3 rule
  data          DATA_PATH's shards (headers, sizes, validation ids < VOCAB_SIZE) and TOKENIZER_PATH (loads,
                VOCAB_SIZE pieces), each file against DATA_PATH/summary.json (data/build_shards.py: each
                shard's bytes and sha256, the tokenizer's sha256) or else the downloader's manifest.json
                (data/cached_challenge_fineweb.py): the published manifest lists no hashes (the downloader
                checks the Hub's sha256 while downloading and records none), so that check is sizes only
                and its line says so; --no-hash checks sizes only
  disk          free space under the run's folder against what the run may write (train_gpt.py's rule:
                two checkpoints per rank, the float checkpoint, the artifact)
  eval budget   not estimated here: it times the compiled model on the GPUs. The run estimates it before
                training (log lines `eval_budget_estimate` and `eval_budget_competition`) and refuses to
                train over EVAL_BUDGET_S; --warm-compile gives that estimate now
  warm compile  (--warm-compile, minutes when the cache is cold) train_gpt.py itself, launched as the run
                would be with ITERATIONS=--warm-iterations and TRAIN_ONLY=1 into a throwaway OUT_DIR (deleted):
                its warmup compiles the training graphs and its budget check the evaluation's, so Inductor's
                cache is warm for the real run, and its own eval budget estimate is reported. (scripts/dry_run.py
                compiles the training step only and estimates no evaluation, so it is not used for this.)

Exit status: 0 no FAIL; 1 a FAIL; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
ALLREDUCE_BYTES = 256 << 20
HEADER_INTS, SHARD_MAGIC, SHARD_VERSION = 256, 20240520, 1  # the challenge's shard format
# Bus bandwidth thresholds (GB/s). Approximate, from NVIDIA's published nccl-tests figures, not measured by this
# repository: 8xH100 SXM (NVLink 4) reach roughly 350-400 GB/s on a large all-reduce without NVLS; a box whose GPUs
# talk over PCIe reaches a few tens. Below FAIL_BUSBW the box has no working NVLink between its GPUs.
FAIL_BUSBW, WARN_BUSBW = 100.0, 250.0


class Result(NamedTuple):
    status: str  # PASS, WARN, FAIL or SKIP
    name: str
    figure: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.figure}"


def load_script(path: Path):
    """train_gpt.py (or the file at `path`) as a module: importing it does nothing but define names."""
    spec = importlib.util.spec_from_file_location("preflight_train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------------------------


def check_gpus(expected: int) -> Result:
    if not torch.cuda.is_available():
        return Result("FAIL", "gpus", f"no GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                                      f"CUDA {torch.version.cuda})")
    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    figure = ", ".join(f"{n} x {name}" for name, n in collections.Counter(names).items())
    free_total = [torch.cuda.mem_get_info(i) for i in range(count)]
    busy = [f"GPU {i} {(total - free) / 2**30:.1f} GiB" for i, (free, total) in enumerate(free_total)
            if free < 0.9 * total]
    if count < expected:
        return Result("FAIL", "gpus", f"{figure}: {count} GPU(s), the run needs {expected} (--gpus)")
    if busy:
        return Result("WARN", "gpus", f"{figure}; memory in use by another process: {', '.join(busy)}")
    if not all("H100" in name for name in names):
        return Result("WARN", "gpus", f"{figure}: not H100s, the kind the 10-minute track is timed on")
    return Result("PASS", "gpus", figure)


# ---------------------------------------------------------------------------------------------
# NCCL all-reduce bandwidth
# ---------------------------------------------------------------------------------------------


def allreduce_worker(rank: int, world: int, port: int, size_bytes: int, iters: int, backend: str, result: str):
    """One rank: all-reduce a float32 tensor of size_bytes `iters` times (after 5 untimed), then check one sum."""
    import torch.distributed as dist

    os.environ.update(NO_MULTICAST, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if cuda else None)
    try:
        x = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
        for _ in range(5):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        x.fill_(rank + 1)
        dist.all_reduce(x)
        correct = bool((x == world * (world + 1) / 2).all())
        if rank == 0:
            Path(result).write_text(json.dumps(dict(seconds=seconds.item(), correct=correct)))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_allreduce(world: int, size_bytes: int = ALLREDUCE_BYTES, iters: int = 20, backend: str = "nccl",
                      timeout_s: float = 60.0) -> dict:
    """{'seconds': per all-reduce, 'correct': bool, 'busbw_gbs': ...} from `world` spawned processes; raises
    TimeoutError (the processes are killed) or the first worker's error."""
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in NO_MULTICAST}
    os.environ.update(NO_MULTICAST)  # the spawned workers start with it
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        try:
            context = mp.start_processes(allreduce_worker, args=(world, free_port(), size_bytes, iters, backend,
                                                                 str(result)),
                                         nprocs=world, join=False, start_method="spawn")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.update({k: v})
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result in {timeout_s:g} s (a hung NCCL init or a GPU that does not answer)")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        out = json.loads(result.read_text())
    algbw = size_bytes / out["seconds"] / 1e9
    return dict(out, algbw_gbs=algbw, busbw_gbs=algbw * 2 * (world - 1) / world)


def check_nccl(world: int, timeout_s: float, min_busbw: float = FAIL_BUSBW, warn_busbw: float = WARN_BUSBW) -> Result:
    if world < 2:
        return Result("SKIP", "nccl", f"{world} GPU(s): no all-reduce between GPUs to measure")
    try:
        m = measure_allreduce(world, timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure of the workers is the finding
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return Result("FAIL", "nccl", f"all-reduce over {world} GPUs failed: {last}")
    figure = (f"bus bandwidth {m['busbw_gbs']:.0f} GB/s (256 MB all-reduce over {world} GPUs, "
              f"{1000 * m['seconds']:.2f} ms; NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1)")
    if not m["correct"]:
        return Result("FAIL", "nccl", figure + ": WRONG SUM after the all-reduce")
    if m["busbw_gbs"] < min_busbw:
        return Result("FAIL", "nccl", f"{figure}: below {min_busbw:g} GB/s, no working NVLink")
    if m["busbw_gbs"] < warn_busbw:
        return Result("WARN", "nccl", f"{figure}: below {warn_busbw:g} GB/s, slower than an H100 SXM box")
    return Result("PASS", "nccl", figure)


# ---------------------------------------------------------------------------------------------
# FlashAttention 3 against SDPA
# ---------------------------------------------------------------------------------------------


def sdpa_attention(q, k, v):
    """Causal attention on (B, T, H, D) tensors with fewer k/v heads (GQA), as PyTorch computes it."""
    groups = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def output_and_grads(attention, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v)
    out = out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, softmax_lse)
    out.backward(grad_out.to(out.dtype))
    return [torch.zeros_like(x, dtype=torch.float32) if t is None else t.detach().float()  # no gradient: all wrong
            for t, x in ((out, out), (q.grad, q), (k.grad, k), (v.grad, v))]


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return ((a - reference).norm() / reference.norm().clamp(min=1e-30)).item()


def numerics(name: str, what: str, kernel, reference, q, k, v, grad_out, shape_text: str) -> Result:
    """`kernel`'s output and q, k, v gradients against `reference` run in float32: each relative error must be at most
    twice `reference`'s own in bf16, plus 1e-3 (FlashAttention's own tests' rule). `what` names the kernel."""
    exact = output_and_grads(reference, q.float(), k.float(), v.float(), grad_out.float())
    pytorch = output_and_grads(reference, q, k, v, grad_out)
    try:
        got = output_and_grads(kernel, q, k, v, grad_out)
    except Exception as exc:  # noqa: BLE001
        return Result("FAIL", name, f"{what} raised {type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc) else ''}")
    parts, bad = [], []
    for part, ours, theirs, ref in zip(("out", "dq", "dk", "dv"), got, pytorch, exact):
        err, limit = relative_error(ours, ref), 2 * relative_error(theirs, ref) + 1e-3
        parts.append(f"{part} {err:.1e} (limit {limit:.1e})")
        if not err <= limit:  # NaN fails too
            bad.append(part)
    figure = f"{shape_text}, relative error vs float32: " + ", ".join(parts)
    return Result("FAIL" if bad else "PASS", name, figure + (f": {', '.join(bad)} off" if bad else ""))


def check_fa3(shape: tuple[int, int, int, int, int], device: torch.device | None) -> list[Result]:
    """shape = (B, T, heads, kv_heads, head_dim). `device` None: the import alone (no GPU to run on)."""
    try:
        module = importlib.import_module("flash_attn_interface")
        kernel = module.flash_attn_func
    except ImportError as exc:
        return [Result("WARN", "fa3", f"flash_attn_interface not importable ({exc}): attention runs on PyTorch "
                                      "SDPA, slower than the records' FA3 (ATTN_BACKEND=auto falls back by itself)")]
    except Exception as exc:  # noqa: BLE001 - a broken install, e.g. a wheel built for another torch
        return [Result("FAIL", "fa3", f"importing flash_attn_interface raised {type(exc).__name__}: {exc}")]
    found = Result("PASS", "fa3", f"flash_attn_interface imports ({getattr(module, '__file__', '?')})")
    if device is None:
        return [found, Result("SKIP", "fa3 numerics", "no GPU to run flash_attn_func on")]
    B, T, H, KV, D = shape
    g = torch.Generator(device).manual_seed(0)
    q, grad_out = (torch.randn(B, T, H, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, T, KV, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    return [found, numerics("fa3 numerics", "flash_attn_func", lambda *qkv: kernel(*qkv, causal=True), sdpa_attention,
                            q, k, v, grad_out, f"B={B} T={T} heads={H}/{KV} dim={D}")]


def run_doc_attention(tg, cfg, ids: torch.Tensor):
    """(kernel, its name): train_gpt's document-masked attention for the batch `ids`, made as its compiled run makes it
    (GPT.attention_mask outside the blocks, Attention.attend compiled inside them): FA3's varlen kernel over the
    batch's segments when it imports, else flex_attention under a compiled block mask. q, k, v: (B, heads, T, dim)."""
    backend = tg.attention_backend_name(cfg, "cuda")
    with ids.device:  # made where it runs (its orthogonal init takes seconds on a CPU); its weights are not used
        model = tg.GPT(cfg, compile=True, fa3=backend.startswith("fa3"))
    mask = model.attention_mask(ids, False, None)
    attend = torch.compile(model.blocks[0].attn.attend, fullgraph=True)

    def kernel(q, k, v):  # attend takes and gives the projections' (B, T, heads, dim)
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)

    return kernel, backend


def check_doc_mask(tg, cfg, device: torch.device | None, make_kernel=run_doc_attention) -> list[Result]:
    """DOC_MASK=1: the run's document-masked attention (make_kernel(tg, cfg, ids): (kernel, name)) against SDPA
    with the boolean mask of the same documents, on up to 4 sequences of the run's shapes with a BOS every ~400
    tokens at random places (one sequence one document). Nothing when DOC_MASK is off."""
    if not cfg.doc_mask:
        return []
    if device is None:
        return [Result("SKIP", "doc mask numerics", "no GPU to run the document-masked kernel on")]
    B, T, H, KV = min(cfg.micro_batch_seqs, 4), cfg.train_seq_len, cfg.num_heads, cfg.num_kv_heads
    D = cfg.model_dim // H
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (B, T), generator=g, device=device)
    ids[:, 0] = tg.BOS_ID
    ids[:-1].scatter_(1, torch.randint(1, T, (B - 1, max(1, T // 400)), generator=g, device=device), tg.BOS_ID)
    q, grad_out = (torch.randn(B, H, T, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, KV, T, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    allowed = tg.document_mask(ids)

    def reference(q, k, v):
        k, v = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    try:
        kernel, what = make_kernel(tg, cfg, ids)
    except Exception as exc:  # noqa: BLE001
        return [Result("FAIL", "doc mask numerics", f"building the document mask raised {type(exc).__name__}: {exc}")]
    return [numerics("doc mask numerics", what, kernel, reference, q, k, v, grad_out,
                     f"{what} B={B} T={T} heads={H}/{KV} dim={D} documents={int((ids == tg.BOS_ID).sum())}")]


def fa3_device() -> torch.device | None:
    return torch.device("cuda", 0) if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# Config, data, disk
# ---------------------------------------------------------------------------------------------


def check_config(tg, env: dict, world: int):
    """(Result, cfg or None): build_config as the run calls it."""
    try:
        cfg = tg.build_config(env, world)
    except Exception as exc:  # noqa: BLE001 - ConfigError and its kin: the message names the variable
        return Result("FAIL", "config", str(exc)), None
    names = {f.name.upper() for f in dataclasses.fields(cfg)} - {"WORLD_SIZE"}
    knobs = sorted(k for k in env if k in names)
    set_text = ", ".join(f"{k}={env[k]}" for k in knobs[:12]) + (", ..." if len(knobs) > 12 else "")
    return Result("PASS", "config", f"{len(knobs)} variable(s) set{': ' + set_text if knobs else ''}; "
                                    f"{world} process(es), {cfg.micro_steps} micro-step(s) of "
                                    f"{cfg.micro_batch_seqs} x {cfg.train_seq_len} tokens"), cfg


def shard_tokens(path: Path) -> tuple[int | None, str | None]:
    """(token count, None) of a valid shard, or (None, what is wrong)."""
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS:
        return None, f"{size} bytes, shorter than a shard header"
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        return None, f"not a token shard (magic {header[0]}, version {header[1]})"
    count = int(header[2])
    if size != 4 * HEADER_INTS + 2 * count:
        return None, f"{size} bytes, its header says {count} tokens ({4 * HEADER_INTS + 2 * count} bytes)"
    return count, None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_manifest(data: Path) -> tuple[Path, Path] | tuple[None, None]:
    """(manifest.json, the folder its paths are relative to): the downloader keeps it in the folder above
    datasets/<name>/ (data/manifest.json for data/datasets/fineweb10B_sp8192)."""
    for root in (data.parent.parent, data.parent):
        if (root / "manifest.json").is_file():
            return root / "manifest.json", root
    return None, None


def reference_entries(data: Path, tokenizer: Path) -> tuple[str, dict[Path, dict]]:
    """(where the expected values come from, {file: {'bytes', 'tokens', 'sha256'} as far as known})."""
    summary = data / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text(encoding="utf-8"))
        entries = {data / shard["file"]: shard for split in s.get("splits", {}).values()
                   for shard in split.get("shards", []) + split.get("byte_shards", [])}
        if s.get("tokenizer", {}).get("sha256"):
            entries[tokenizer] = dict(sha256=s["tokenizer"]["sha256"], what="the tokenizer summary.json names")
        return str(summary), entries
    manifest, root = find_manifest(data)
    if manifest is None:
        return "", {}
    m = json.loads(manifest.read_text(encoding="utf-8"))
    files = m.get("files") or []
    files = [{"path": k, **v} for k, v in files.items()] if isinstance(files, dict) else files
    entries = {root / str(e["path"]).strip("/"): e for e in files if isinstance(e, dict) and "path" in e}
    dataset = next((d for d in m.get("datasets") or [] if isinstance(d, dict) and root / str(
        d.get("path") or f"datasets/{d.get('name')}") == data), None)
    for split in ("train", "val"):
        count = ((dataset or {}).get("stats") or {}).get(f"files_{split}")
        for i in range(int(count or 0)):
            entries.setdefault(data / f"fineweb_{split}_{i:06d}.bin", {})["listed"] = True
    if not any(path.parent == data for path in entries):  # a manifest of other datasets: nothing to compare with
        return "", {}
    return str(manifest), entries


def check_data(tg, cfg, hash_files: bool = True) -> Result:
    data, tokenizer, problems = Path(cfg.data_path), Path(cfg.tokenizer_path), []
    if not data.is_dir():
        return Result("FAIL", "data", f"DATA_PATH={cfg.data_path}: folder not found")
    shards = {split: tg.shard_files(data, split) for split in ("train", "val")}  # as the run finds them
    problems += [f"no fineweb_{split}_*.bin in DATA_PATH={data}" for split, paths in shards.items() if not paths]
    sidecars = tg.shard_files(data, "val_bytes")  # CaseOps' byte counts: checked like the shards
    counts = {}
    for path in shards["train"] + shards["val"] + sidecars:
        counts[path], problem = shard_tokens(path)
        if problem:
            problems.append(f"{path.name}: {problem}")
    try:
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
        if pieces != cfg.vocab_size:
            problems.append(f"TOKENIZER_PATH={tokenizer}: {pieces} pieces, VOCAB_SIZE={cfg.vocab_size}")
    except Exception as exc:  # noqa: BLE001 - missing file or not a model: sentencepiece says which
        problems.append(f"TOKENIZER_PATH={tokenizer}: {'file not found' if not tokenizer.is_file() else exc}")
    val = [p for p in shards["val"] if counts.get(p)]
    if val and not problems:
        window = cfg.train_seq_len
        top = max(int(np.memmap(p, dtype="<u2", mode="r", offset=4 * HEADER_INTS).max()) for p in val)
        if top >= cfg.vocab_size:
            problems.append(f"validation token id {top} >= VOCAB_SIZE={cfg.vocab_size}: another tokenizer's shards")
        if sum(counts[p] for p in val) < window + 1:
            problems.append(f"validation split shorter than one window ({window} + 1 tokens)")
    source, entries = reference_entries(data, tokenizer)
    local = [*shards["train"], *shards["val"], *sidecars] + ([tokenizer] if tokenizer.is_file() else [])
    hashed, start = [p for p in local if entries.get(p, {}).get("sha256")] if hash_files else [], time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
        digests = dict(zip(hashed, pool.map(sha256_of, hashed)))
    for path in local:
        expected = entries.get(path)
        if source and expected is None and path != tokenizer:
            problems.append(f"{path.name}: not listed in {source}")
        elif expected and "bytes" in expected and path.stat().st_size != int(expected["bytes"]):
            problems.append(f"{path.name}: {path.stat().st_size} bytes, {source} says {expected['bytes']}")
        elif expected and expected.get("tokens") not in (None, counts.get(path)):
            problems.append(f"{path.name}: {counts.get(path)} tokens, {source} says {expected['tokens']}")
        elif path in digests and digests[path] != expected["sha256"].lower():
            problems.append(f"{path.name}: sha256 {digests[path][:12]}..., {source} says {expected['sha256'][:12]}...")
    missing = [p.name for p, e in entries.items() if p.parent == data and p.suffix == ".bin" and not p.is_file()
               and (e.get("file") or p.name.startswith("fineweb_val_"))]  # summary.json: all; manifest: the val split
    problems += [f"{name}: listed in {source}, not in DATA_PATH" for name in missing]
    gb = sum(p.stat().st_size for p in local) / 1e9
    figure = (f"{len(shards['train'])} train + {len(shards['val'])} val shards"
              f"{f' + {len(sidecars)} byte sidecar(s)' if sidecars else ''} ({gb:.1f} GB) in {data}, "
              f"tokenizer {tokenizer.name}")
    if problems:
        return Result("FAIL", "data", f"{figure}: " + "; ".join(problems[:4]) +
                      (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))
    if not source:
        return Result("WARN", "data", f"{figure}; headers and sizes only: no summary.json in DATA_PATH and no "
                                      "downloader manifest.json above it that lists it, to compare with")
    unhashed = len([p for p in local if p in entries]) - len(digests)
    how = (f"sha256 of {len(digests)} files matches {source} ({time.perf_counter() - start:.1f} s)" if digests else
           f"sizes only: {source} lists no sha256" if hash_files else f"sizes only (--no-hash) against {source}")
    if digests and unhashed:
        how += f"; {unhashed} file(s) it lists without a sha256: sizes only"
    return Result("PASS", "data", f"{figure}; {how}")


def run_folder(cfg) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / (cfg.run_id or "")


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def parameter_count(tg, cfg) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return sum(p.numel() for p in tg.GPT(cfg).parameters())


def check_disk(tg, cfg, world: int) -> Result:
    """train_gpt.py's check_free_space: per rank two checkpoints of at most 5 floats a weight (itself, EMA, SWA, two
    optimizer states), then the float checkpoint and the artifact."""
    folder = existing_parent(run_folder(cfg))
    params = parameter_count(tg, cfg)
    need = (10 * world + 3) * 4 * params + 16_000_000
    free = shutil.disk_usage(folder).free
    figure = f"{free / 1e9:.1f} GB free at {folder}; the run may write {need / 1e9:.1f} GB ({params:,} parameters)"
    return Result("PASS" if free >= need else "FAIL", "disk", figure)


# ---------------------------------------------------------------------------------------------
# Evaluation budget and the warm compile
# ---------------------------------------------------------------------------------------------


def eval_budget_pointer(cfg) -> Result:
    return Result("SKIP", "eval budget", "not estimated here (it times the compiled model on the GPUs); the run "
                  "estimates it before training, log lines `eval_budget_estimate ... total:Ts` and "
                  f"`eval_budget_competition total:Ts`, and refuses to train over EVAL_BUDGET_S="
                  f"{cfg.eval_budget_s:g}; --warm-compile reports it now")


def warm_command(script: Path, nproc: int) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(script)]
    return [sys.executable, str(script)]


def warm_compile(script: Path, env: dict, nproc: int, cfg, iterations: int, timeout_s: float) -> list[Result]:
    """train_gpt.py with ITERATIONS=iterations TRAIN_ONLY=1 into a throwaway OUT_DIR beside the run's folder."""
    parent = existing_parent(run_folder(cfg))
    tmp = Path(tempfile.mkdtemp(prefix=".preflight_warm_", dir=parent))
    run_env = {k: v for k, v in env.items() if k not in ("RESUME", "EVAL_ONLY", "RUN_ID")}
    run_env.update(NO_MULTICAST, ITERATIONS=str(iterations), TRAIN_ONLY="1", OUT_DIR=str(tmp / "run"),
                   VAL_LOSS_EVERY="0", CHECKPOINT_EVERY="0")
    start = time.perf_counter()
    try:
        proc = subprocess.run(warm_command(script, nproc), env=run_env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [Result("FAIL", "warm compile", f"{script.name} did not finish in {timeout_s:g} s (--warm-timeout)"),
                Result("SKIP", "eval budget", "the warm-compile run did not finish")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds, out = time.perf_counter() - start, proc.stdout + proc.stderr
    errors = re.findall(r"^error: (.*)$", out, re.M)
    if proc.returncode != 0:
        error = errors[-1] if errors else (out.strip().splitlines() or ["no output"])[-1]
        budget = "EVAL_BUDGET_S" in error
        return [Result("FAIL", "warm compile", f"{script.name} exited {proc.returncode} after {seconds:.0f} s: "
                                               f"{error}"),
                Result("FAIL", "eval budget", error) if budget else
                Result("SKIP", "eval budget", "the warm-compile run failed before its estimate")]
    warmup = re.search(r"^warmup_time:(\S+)", out, re.M)
    stats = re.search(r"^compile_stats (.*)$", out, re.M)
    results = [Result("PASS", "warm compile", f"{script.name} ITERATIONS={iterations} TRAIN_ONLY=1 on {nproc} "
                      f"process(es) in {seconds:.0f} s; warmup_time:{warmup[1] if warmup else '?'}"
                      + (f"; {stats[1]}" if stats else ""))]
    estimate = re.search(r"^eval_budget_estimate .*total:([\d.]+)s budget:([\d.]+)s", out, re.M)
    scaled = re.search(r"^eval_budget_competition total:([\d.]+)s", out, re.M)
    if not estimate:
        return results + [Result("SKIP", "eval budget", "the warm-compile run logged no eval_budget_estimate")]
    total, budget = float(estimate[1]), float(estimate[2])
    at_scale = float(scaled[1]) if scaled else 0.0
    worst = max(total, at_scale)
    return results + [Result("PASS" if worst <= budget else "FAIL", "eval budget",
                             f"the run's own estimate: {total:.0f} s on this box, {at_scale:.0f} s at the "
                             f"competition's scale (8 GPUs), budget {budget:g} s")]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the run needs (default 8)")
    p.add_argument("--nproc", type=int, default=0, help="processes the run launches (default: the GPUs found, or 1)")
    p.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="the train_gpt.py to check against")
    p.add_argument("--no-hash", action="store_true", help="check the data's sizes only (no sha256)")
    p.add_argument("--nccl-timeout", type=float, default=60.0, help="seconds for the all-reduce test (default 60)")
    p.add_argument("--min-busbw", type=float, default=FAIL_BUSBW, help=f"FAIL below (GB/s, default {FAIL_BUSBW:g})")
    p.add_argument("--warm-compile", action="store_true", help="also run train_gpt.py briefly (minutes when cold)")
    p.add_argument("--warm-iterations", type=int, default=5, help="ITERATIONS of that run (default 5)")
    p.add_argument("--warm-timeout", type=float, default=1200.0, help="seconds for that run (default 1200)")
    args = p.parse_args(argv)
    if args.gpus < 0 or args.nproc < 0 or args.warm_iterations < 1:
        p.error("--gpus and --nproc must be >= 0, --warm-iterations >= 1")
    for flag, value in (("--nccl-timeout", args.nccl_timeout), ("--warm-timeout", args.warm_timeout)):
        if not 0 < value < math.inf:  # inf: subprocess's timeout cannot take it (OverflowError)
            p.error(f"{flag} {value:g}: must be a finite number above 0 seconds")
    if not 0 <= args.min_busbw < math.inf:  # inf: every box would FAIL
        p.error(f"--min-busbw {args.min_busbw:g}: must be a finite number >= 0 GB/s")
    if not args.script.is_file():
        p.error(f"--script {args.script}: file not found")
    return args


def run_checks(args, env: dict, say=print) -> list[Result]:
    results = []

    def add(*found: Result) -> None:
        for r in found:
            results.append(r)
            say(r.line())
    try:
        tg = load_script(args.script)
    except Exception as exc:  # noqa: BLE001
        add(Result("FAIL", "script", f"cannot import {args.script}: {type(exc).__name__}: {exc}"))
        return results
    add(check_gpus(args.gpus))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = args.nproc or max(gpus, 1)
    config, cfg = check_config(tg, env, nproc)
    add(config)
    add(check_nccl(gpus, args.nccl_timeout, args.min_busbw) if gpus else
        Result("SKIP", "nccl", "no GPU: no all-reduce to measure"))
    if cfg is None:  # the data and disk checks read the paths the run would read
        with contextlib.suppress(Exception):
            names = ("DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE", "OUT_DIR", "RUN_ID")
            cfg = tg.build_config({k: env[k] for k in names if k in env}, 1)
    shape = (cfg.micro_batch_seqs, cfg.train_seq_len, cfg.num_heads, cfg.num_kv_heads,
             cfg.model_dim // cfg.num_heads) if cfg is not None and config.status == "PASS" else (1, 2048, 8, 4, 64)
    device = fa3_device()
    add(*check_fa3(shape, device))
    if cfg is not None and config.status == "PASS":
        add(*check_doc_mask(tg, cfg, device))
    if cfg is None:
        add(Result("SKIP", "data", "the settings do not parse"), Result("SKIP", "disk", "the settings do not parse"))
        return results
    add(check_data(tg, cfg, not args.no_hash))
    add(check_disk(tg, cfg, nproc))
    if not args.warm_compile:
        add(eval_budget_pointer(cfg))
    elif any(r.status == "FAIL" for r in results):
        add(Result("SKIP", "warm compile", "not started: a check above failed"), eval_budget_pointer(cfg))
    else:
        add(*warm_compile(args.script, env, nproc, cfg, args.warm_iterations, args.warm_timeout))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    results = run_checks(args, dict(os.environ))
    tally = collections.Counter(r.status for r in results)
    verdict = "NOT ready: fix the FAIL lines before a paid run" if tally["FAIL"] else "ready"
    print(f"preflight: {tally['PASS']} PASS, {tally['WARN']} WARN, {tally['FAIL']} FAIL, {tally['SKIP']} SKIP "
          f"in {time.perf_counter() - start:.1f} s: {verdict}")
    return 1 if tally["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
