"""Parameter Golf training script: a shared-block GPT trained, quantized, reloaded and scored.

One file, read top to bottom: config -> optimizer -> data -> model -> evaluation ->
quantization/export -> training -> main(). Every knob is an environment variable (see the
Config dataclass or README.md); `torchrun --standalone --nproc_per_node=N train_gpt.py` runs it
on N GPUs, plain `python train_gpt.py` on one GPU or on the CPU (tiny configurations).

Importing this file does nothing: no environment reads, no CUDA, no process group.
Size rule (tests/test_style.py): at most 30,000 code tokens (comments and docstrings are free), at most 11.5 per code
line on average, no function over 80 lines, no line over 120 characters; the packed file a run ships <= 64,000 bytes.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import copy
import dataclasses
import datetime
import enum
import hashlib
import importlib
import io
import json
import lzma
import math
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.constants import default_pg_timeout
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

try:
    import zstandard
except ImportError:  # reported by check_inputs, before any GPU work
    zstandard = None
try:
    import brotli
except ImportError:  # optional: only COMPRESSOR=brotli needs it
    brotli = None

ARTIFACT_LIMIT_BYTES = 16_000_000
CODECS = ("brotli", "zstd")
ZSTD_LEVEL = 22  # the strongest; brotli runs at its strongest too (quality 11)

# ----------------------------------------------------------------------------------------------
# Configuration
#
# Every knob is a field of one frozen dataclass; the field `num_unique_layers` is the environment variable
# NUM_UNIQUE_LAYERS. build_config() parses a mapping (os.environ in main, a dict in tests) strictly, checks relations
# between knobs, and raises ConfigError naming the variable. Names of the upstream baseline keep their meaning.
# Unknown variables one typo away from a knob are errors too: a misspelt knob, silently ignored, costs a paid run.
# ----------------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (subclasses name their own)."""

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class Refused(UserError):
    """A run refused after its folder was made, before training: the folder (only its log so far) is removed."""


class Interrupted(UserError):
    """SIGTERM/SIGINT: every rank stops on the same step, writes a checkpoint for RESUME, exports nothing (exit 5)."""

    exit_code = 5


class Diverged(UserError):
    """The training loss turned non-finite: training stops, nothing is exported (exit code 4)."""

    exit_code = 4


def knob(default, help: str, choices: tuple = ()):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def derived():
    return dataclasses.field(default=None, metadata={"derived": True})


@dataclasses.dataclass(frozen=True)
class Config:
    # data and run
    data_path: str = knob("./data/datasets/fineweb10B_sp8192", "folder with fineweb_train_*.bin and fineweb_val_*.bin")
    tokenizer_path: str = knob("./data/tokenizers/fineweb_8192_bpe.model", "SentencePiece .model for byte counting")
    run_id: str = knob("", "run name; empty = time stamp + random suffix")
    out_dir: str = knob("", "folder for the log and artifact; empty = runs/<RUN_ID>; must not exist or be empty")
    resume: str = knob("", "continue the run in this folder from its checkpoint (same settings, same number of ranks)")
    checkpoint_every: float = knob(0.0, "write a checkpoint every N seconds of training; 0 = on SIGTERM/SIGINT only")
    seed: int = knob(1337, "seed for initialization")
    # model shape
    vocab_size: int = knob(8192, "vocabulary size; must equal the tokenizer's")
    num_layers: int = knob(17, "virtual depth L at full depth (layers run per forward)")
    num_unique_layers: int = knob(11, "physical blocks U; 0 = NUM_LAYERS (no sharing)")
    loop_start: int = knob(3, "first physical block of the looped core")
    loop_end: int = knob(5, "last physical block of the looped core (inclusive); -1 = U-1")
    eval_repeats: int = knob(0, "passes through the core at evaluation; 0 = the training passes R")
    prog_depth: str = knob("0.35:1,1.0:3", "progressive depth 'f1:r1,...,1.0:R': r_i core passes till run fraction f_i")
    model_dim: int = knob(512, "residual width")
    num_heads: int = knob(8, "query heads")
    num_kv_heads: int = knob(4, "key/value heads (GQA); must divide NUM_HEADS")
    mlp_mult: float = knob(4.0, "MLP hidden width as a multiple of MODEL_DIM (fractions allowed)")
    mlp_act: str = knob("leaky_relu2", "relu2: relu(x)^2, leaky_relu2: leaky_relu(x, 0.5)^2", ("relu2", "leaky_relu2"))
    tied_embed_init_std: float = knob(0.005, "init std of the tied embedding")
    rope_base: float = knob(10000.0, "RoPE base frequency")
    logit_softcap: float = knob(30.0, "tanh soft-cap on logits")
    qk_gain_init: float = knob(5.0, "initial per-head query gain (after QK RMSNorm)")
    xsa_last_n: int = knob(-1, "exclusive self-attention on the last N virtual layers; -1 = all")
    rope_dims: int = knob(16, "rotary dimensions per head (partial RoPE: the rest carry no position); 0 = all")
    ln_scale: bool = knob(True, "scale each block's normed inputs by 1/sqrt(physical block index + 1)")
    parallel_residual_start: int = knob(7, "from this physical block on, attention and MLP read one input; -1 = none")
    parallel_lanes_start: int = knob(8, "from this block on, attention reads residual lane 0, MLP lane 1; -1 = off")
    skip_gates_enabled: bool = knob(True, "gated U-Net skips: x = lerp(w*skip, x, sigmoid(g)), not x + w*skip")
    layer_rows: str = knob("block", "scales and residual mix: a row per virtual layer or block", ("virtual", "block"))
    loop_embed: bool = knob(False, "a learned, zero-init embedding added at every virtual layer")
    ortho_init: bool = knob(True, "orthogonal init of the block matrices (zero-init output projections stay zero)")
    smear_gate: bool = knob(True, "add the previous token's embedding through a learned gate (zero-init); not at BOS")
    gate_window: int = knob(12, "channels read by SMEAR_GATE (of the embedding) and ATTN_GATE (of a layer's input)")
    attn_gate: float = knob(0.0, "s > 0: heads' outputs times sigmoid(s * w_h . input[:GATE_WINDOW]), w zero-init")
    doc_mask: bool = knob(False, "attention stays inside documents (each starts with a BOS): FA3 varlen or flex")
    # batch and schedule
    train_seq_len: int = knob(2048, "training sequence length (also the evaluation window)")
    train_batch_tokens: int = knob(786_432, "tokens per optimizer step, all ranks together")
    micro_batch_tokens: int = knob(131_072, "most tokens per GPU in a micro-batch; a step runs the fewest micro-steps")
    iterations: int = knob(20_000, "maximum optimizer steps")
    max_wallclock_seconds: float = knob(600.0, "training time cap in seconds; 0 = no cap")
    warmup_steps: int = knob(20, "compile/priming steps whose updates are thrown away (not an LR warmup)")
    warmdown_frac: float = knob(0.85, "LR decays linearly to 0 over this last fraction of the run")
    min_lr: float = knob(0.1, "floor of the LR multiplier during the warmdown")
    val_loss_every: int = knob(1000, "validate every N steps (0 = only at the end)")
    val_batch_size: int = knob(524_288, "evaluation tokens per forward, all ranks together")
    train_log_every: int = knob(200, "log a train line every N steps")
    # optimizer
    tied_embed_lr: float = knob(0.03, "Adam LR of the token embedding (tied to the output head)")
    matrix_lr: float = knob(0.026, "Muon LR of block matrices")
    scalar_lr: float = knob(0.02, "Adam LR of vectors, scales and per-layer rows")
    muon_momentum: float = knob(0.97, "Muon momentum (Nesterov)")
    muon_backend_steps: int = knob(5, "Newton-Schulz iterations")
    muon_ns: str = knob(
        "polar",
        "Newton-Schulz coefficients: quintic (one fixed) or polar (Polar Express, one per "
        "iteration; closer to orthogonal in the same steps)",
        ("quintic", "polar"),
    )
    muon_momentum_warmup_start: float = knob(0.92, "Muon momentum at the start of its warmup")
    muon_momentum_warmup_frac: float = knob(0.33, "momentum warmup as a fraction of the run")
    muon_weight_decay: float = knob(0.095, "decoupled weight decay of Muon matrices (times LR)")
    muon_row_normalize: bool = knob(True, "scale each row of Muon's Nesterov update to unit norm before Newton-Schulz")
    embed_wd: float = knob(0.085, "decoupled weight decay of the embeddings (times LR)")
    adam_wd: float = knob(0.02, "decoupled weight decay of the Adam-trained vectors and scales (times LR)")
    beta1: float = knob(0.9, "Adam beta1")
    beta2: float = knob(0.99, "Adam beta2")
    adam_eps: float = knob(1e-8, "Adam epsilon")
    grad_clip_norm: float = knob(0.3, "clip the global gradient norm; 0 = off")
    # weight averaging
    ema_horizon: float = knob(0.063, "EMA of the weights with this time constant, as a fraction of the run; 0 = off")
    swa_start: float = knob(0.0, "SWA: average snapshots from this run fraction on (at full depth); 0 = off")
    swa_every: int = knob(10, "SWA: take a snapshot every N steps")
    export_weights: str = knob("ema", "weights to export: last, ema or swa", ("last", "ema", "swa"))
    # runtime and export
    compile: bool = knob(True, "torch.compile the training graph on CUDA (CPU always runs eager)")
    attn_backend: str = knob("auto", "auto: FlashAttention 3 if installed (compiled CUDA); sdpa: off", ("auto", "sdpa"))
    compressor: str = knob("brotli", "artifact codec: brotli (quality 11) or zstd (level 22)", CODECS)
    quant_bits_attn: int = knob(6, "bits per weight of attention matrices in the artifact (5-8)")
    quant_bits_mlp: int = knob(6, "bits per weight of MLP matrices in the artifact (5-8)")
    quant_bits_embed: int = knob(8, "bits per weight of the embedding table (the tied head) (5-8)")
    matrix_clip_sigmas: float = knob(12.85, "block matrices: row step k*std(row)/qmax, clip at k sigma; 0 = max")
    embed_clip_sigmas: float = knob(20.0, "embedding/head rows' k (as MATRIX_CLIP_SIGMAS); 0 = step from the max")
    gptq: bool = knob(True, "GPTQ with act-order (Hessians of training batches) for block matrices and the head")
    gptq_batches: int = knob(64, "GPTQ calibration micro-batches of training data, shared out over ranks")
    export_reserve_seconds: float = knob(
        12.0,
        "with GPTQ: the most seconds of MAX_WALLCLOCK_SECONDS kept for its calibration (a capped run calibrates on "
        "as many GPTQ_BATCHES as fit in it, and keeps only the time they need)",
    )
    target_bytes: int = knob(16_000_000, "cap on code + model bytes: a larger export coarsens its steps, else exits 3")
    eval_budget_s: float = knob(600.0, "refuse to train when the estimated final evaluations exceed this many seconds")
    eval_stride: int = knob(64, "sliding-window stride (context <= window - stride); 0 or >= window = round trip only")
    ttt_lr: float = knob(0.005, "score-first test-time training: SGD LR on already-scored validation chunks; 0 = off")
    ttt_chunk: int = knob(32_768, "TTT: validation targets per chunk (scored, then trained on)")
    ttt_epochs: int = knob(3, "TTT: SGD steps on each scored chunk")
    ttt_momentum: float = knob(0.9, "TTT: SGD momentum")
    ttt_grad_clip: float = knob(1.0, "TTT: clip the gradient norm of each step; 0 = off")
    ttt_adapter: str = knob("sgd", "TTT trains all weights (sgd) or per-document adapters (lora)", ("sgd", "lora"))
    ttt_lora_rank: int = knob(64, "LoRA TTT: adapter rank (every block's linear maps and the head)")
    ttt_lora_lr: float = knob(2e-4, "LoRA TTT: Adam LR of the adapters")
    ttt_lora_chunk: int = knob(64, "LoRA TTT: a document's targets scored, then trained on, per step")
    ttt_phases: str = knob("", "LoRA TTT: document counts 'n1,n2' after which all weights train on the text so far")
    mix_eta: float = knob(1.0, "n-gram mixer on the score: step of its weights per TTT_CHUNK targets; 0 = off")
    mix_buckets: int = knob(65_536, "n-gram mixer: trigram contexts hashed into this many rows of VOCAB_SIZE counts")
    eval_only: str = knob("", "no training: score this .ptz artifact, or re-export and score this .pt float checkpoint")
    train_only: bool = knob(False, "stop after training and the pre-export score: no export, no final evaluations")
    ship_code: str = knob(
        "packed",
        "the code file the run writes beside the artifact and counts: packed (this "
        "source, xz + base85, self-extracting) or readable (as is)",
        ("packed", "readable"),
    )
    # derived once by build_config (not environment variables)
    world_size: int = derived()
    micro_steps: int = derived()
    micro_batch_seqs: int = derived()
    repeats: int = derived()  # core passes R at full depth
    eval_passes: int = derived()  # core passes at evaluation: EVAL_REPEATS, else R
    unique_blocks: int = derived()  # U
    core_last: int = derived()  # LOOP_END with -1 resolved
    depth_phases: tuple = derived()  # PROG_DEPTH parsed: ((fraction, passes), ...), or ((1.0, R),)
    ttt_phase_docs: tuple = derived()  # TTT_PHASES parsed: (n1, n2, ...)


def env_knobs() -> dict[str, dataclasses.Field]:
    return {f.name.upper(): f for f in dataclasses.fields(Config) if not f.metadata.get("derived")}


# Launcher and system variables that may sit next to our knobs without being typo-checked.
ENV_ALLOWLIST = {
    "RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE",
    "PATH", "PWD", "OLDPWD", "HOME", "USER", "SHELL", "TERM", "LANG", "HOSTNAME", "TMPDIR", "LOGNAME",
    "SHLVL", "CI", "_", "DISPLAY", "EDITOR", "TZ",
}  # fmt: skip
ENV_ALLOWED_PREFIXES = (
    "LOCAL_", "MASTER_", "TORCH", "NCCL_", "CUDA_", "OMP_", "PYTHON", "LC_", "HF_", "TRITON_", "NVIDIA_", "NV_",
    "PYTEST_", "XDG_", "SSH_", "MKL_", "KMP_", "GLOO_", "LD_", "PIP_", "CONDA_", "VIRTUAL_ENV", "OPENBLAS_",
    "CUBLAS_", "CUDNN_", "GIT_",
)  # fmt: skip

# The 2026-04-09 record's names of two knobs, accepted so that its commands run unchanged.
ENV_ALIASES = {"GPTQ_CALIBRATION_BATCHES": "GPTQ_BATCHES", "GPTQ_RESERVE_SECONDS": "EXPORT_RESERVE_SECONDS"}

# Knobs taken out, refused by name rather than ignored: a run that ignored DRY_RUN=1 would train for real.
ENV_REMOVED = {
    "DRY_RUN": "run scripts/dry_run.py",
    "GRAD_ACCUM_STEPS": "MICRO_BATCH_TOKENS sets the micro-steps",
    "WARMDOWN_ITERS": "use WARMDOWN_FRAC",
    "MUON_MOMENTUM_WARMUP_STEPS": "use MUON_MOMENTUM_WARMUP_FRAC",
    "TTT_COSINE": "TTT's LR always falls as half a cosine",
    "ZSTD_LEVEL": "COMPRESSOR=zstd always runs at level 22",
    "EVAL_SEQ_LEN": "evaluation windows are TRAIN_SEQ_LEN long",
    "MLP_CLIP_SIGMAS": "MATRIX_CLIP_SIGMAS sets the attention and MLP matrices alike",
    "TIE_EMBEDDINGS": "the output head is always the token embedding",
    "EMBED_LR": "the embedding is tied to the head: use TIED_EMBED_LR",
    "HEAD_LR": "the head is the tied embedding: use TIED_EMBED_LR",
}
# Values taken out of a knob that stays, refused the same way.
VALUES_REMOVED = {("COMPRESSOR", "lzma"): "use brotli (the default) or zstd"}

# The knobs' ranges, checked by check_config; each error names the variable.
POSITIVE_KNOBS = (
    "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "train_seq_len", "train_batch_tokens",
    "muon_backend_steps", "train_log_every", "val_batch_size", "micro_batch_tokens", "gptq_batches", "swa_every",
    "ttt_epochs", "logit_softcap", "rope_base", "target_bytes", "gate_window", "ttt_lora_rank", "ttt_lora_chunk",
    "mix_buckets", "adam_eps",
)  # fmt: skip
NON_NEGATIVE_KNOBS = (
    "num_unique_layers", "iterations", "warmup_steps", "val_loss_every", "eval_repeats", "matrix_clip_sigmas",
    "embed_clip_sigmas", "ttt_lora_lr", "eval_stride", "max_wallclock_seconds", "grad_clip_norm",
    "muon_weight_decay", "tied_embed_lr", "matrix_lr", "scalar_lr", "tied_embed_init_std", "ttt_lr", "embed_wd",
    "adam_wd", "rope_dims", "ttt_grad_clip", "checkpoint_every", "mix_eta", "export_reserve_seconds", "attn_gate",
)  # fmt: skip
FRACTION_KNOBS = (
    "warmdown_frac", "muon_momentum_warmup_frac", "beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start",
    "ttt_momentum", "ema_horizon", "min_lr",
)  # fmt: skip


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def check_names(env: Mapping[str, str]) -> None:
    """Refuse removed knobs and values, and unknown variables one typo away from a knob."""
    knobs = env_knobs()
    for name in sorted(env):
        require(name not in ENV_REMOVED, f"{name}: no longer a knob; {ENV_REMOVED.get(name)}")
        removed_value = VALUES_REMOVED.get((name, env[name].strip()))
        require(removed_value is None, f"{name}={env[name].strip()}: no longer a choice; {removed_value}")
        if name in knobs or name in ENV_ALLOWLIST or name.startswith(ENV_ALLOWED_PREFIXES):
            continue
        for knob_name in knobs:
            limit = 2 if len(knob_name) > 8 else 1
            if abs(len(name) - len(knob_name)) <= limit and edit_distance(name, knob_name) <= limit:
                raise ConfigError(f"{name}: unknown variable; did you mean {knob_name}?")


def parse_value(name: str, text: str, kind: str, choices: tuple):
    """The value of one variable as its field's type ("bool", "int", "float" or "str" with `choices`)."""
    text = text.strip()
    if kind == "bool":
        require(text.lower() in ("0", "1", "true", "false"), f"{name}={text!r}: expected 0 or 1")
        return text.lower() in ("1", "true")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected an integer") from None
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        require(math.isfinite(value), f"{name}={text!r}: expected a finite number")
        return value
    require(not choices or text in choices, f"{name}={text!r}: expected one of {', '.join(choices)}")
    return text


def build_config(env: Mapping[str, str], world_size: int = 1) -> Config:
    """Parse knobs from `env`, check them, and fill the derived fields."""
    check_names(env)
    for alias, name in ENV_ALIASES.items():
        require(alias not in env or name not in env, f"{alias} and {name}: the same knob set twice; keep one")
    env = {ENV_ALIASES.get(k, k): v for k, v in env.items()}
    values = {}
    for name, field in env_knobs().items():
        if name in env:
            values[field.name] = parse_value(name, env[name], field.type, field.metadata["choices"])
    cfg = Config(**values)
    depth = check_config(cfg)
    local_seqs, rem = divmod(cfg.train_batch_tokens, world_size * cfg.train_seq_len)
    require(
        not rem,
        f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens}: must be a multiple of WORLD_SIZE x "
        f"TRAIN_SEQ_LEN = {world_size} x {cfg.train_seq_len}",
    )
    micro_steps = fewest_micro_steps(local_seqs, max(1, cfg.micro_batch_tokens // cfg.train_seq_len))
    return dataclasses.replace(
        cfg, world_size=world_size, micro_steps=micro_steps, micro_batch_seqs=local_seqs // micro_steps, **depth
    )


def fewest_micro_steps(seqs: int, most_per_micro_step: int) -> int:
    """The fewest micro-steps that split `seqs` sequences evenly, each at most `most_per_micro_step` of them (fewer,
    larger micro-batches run faster while memory lasts)."""
    for steps in range(1, seqs + 1):
        if seqs % steps == 0 and seqs // steps <= most_per_micro_step:
            return steps
    return seqs


def require(ok: bool, message: str, error: type[UserError] = ConfigError) -> None:
    if not ok:
        raise error(message)


def check_config(cfg: Config) -> dict:
    """Check each knob's range and the relations between knobs; return the derived depth fields."""
    for name in POSITIVE_KNOBS:
        require(getattr(cfg, name) > 0, f"{name.upper()}={getattr(cfg, name)}: must be > 0")
    for name in NON_NEGATIVE_KNOBS:
        require(getattr(cfg, name) >= 0, f"{name.upper()}={getattr(cfg, name)}: must be >= 0")
    for name in FRACTION_KNOBS:
        require(0 <= getattr(cfg, name) <= 1, f"{name.upper()}={getattr(cfg, name)}: must be in [0, 1]")
    require(0 <= cfg.swa_start < 1, f"SWA_START={cfg.swa_start}: must be in [0, 1)")
    require(0 <= cfg.seed < 2**32, f"SEED={cfg.seed}: must be in 0..{2**32 - 1}")
    for group in GROUPS:
        bits = getattr(cfg, f"quant_bits_{group}")
        require(5 <= bits <= 8, f"QUANT_BITS_{group.upper()}={bits}: must be in 5..8")
    require(cfg.iterations > 0 or cfg.max_wallclock_seconds > 0, "ITERATIONS=0 and MAX_WALLCLOCK_SECONDS=0: set one")
    require(cfg.beta1 < 1 and cfg.beta2 < 1, f"BETA1={cfg.beta1}, BETA2={cfg.beta2}: must be below 1")
    one_folder_name = re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run_id) and cfg.run_id not in (".", "..")
    require(
        not cfg.run_id or one_folder_name,
        f"RUN_ID={cfg.run_id!r}: must be one folder name (letters, digits, '.', '_', '-')",
    )
    check_shape(cfg)
    require(cfg.export_weights != "ema" or cfg.ema_horizon > 0, "EXPORT_WEIGHTS=ema needs EMA_HORIZON > 0")
    require(cfg.export_weights != "swa" or cfg.swa_start > 0, "EXPORT_WEIGHTS=swa needs SWA_START > 0")
    require(
        cfg.ttt_chunk >= cfg.train_seq_len, f"TTT_CHUNK={cfg.ttt_chunk}: must be >= TRAIN_SEQ_LEN={cfg.train_seq_len}"
    )
    reserve_fits = cfg.export_reserve_seconds < cfg.max_wallclock_seconds
    require(
        cfg.max_wallclock_seconds == 0 or not cfg.gptq or reserve_fits,
        f"EXPORT_RESERVE_SECONDS={cfg.export_reserve_seconds}: must be below MAX_WALLCLOCK_SECONDS",
    )
    depth = check_depth(cfg)
    ttt_phases = parse_ttt_phases(cfg.ttt_phases)
    require(
        not ttt_phases or cfg.ttt_adapter == "lora",
        f"TTT_PHASES={cfg.ttt_phases!r}: phases are LoRA TTT's; set TTT_ADAPTER=lora",
    )
    require(
        not cfg.mix_eta or cfg.ttt_adapter != "lora",
        f"MIX_ETA={cfg.mix_eta:g}: the n-gram mixer does not mix LoRA TTT; set TTT_ADAPTER=sgd or MIX_ETA=0",
    )
    return dict(depth, ttt_phase_docs=tuple(ttt_phases))


def check_shape(cfg: Config) -> None:
    """Relations between the model's width knobs."""
    require(cfg.model_dim % cfg.num_heads == 0, f"NUM_HEADS={cfg.num_heads}: must divide MODEL_DIM={cfg.model_dim}")
    head_dim = cfg.model_dim // cfg.num_heads
    require(head_dim % 2 == 0, f"NUM_HEADS={cfg.num_heads}: head dim MODEL_DIM/NUM_HEADS must be even (RoPE)")
    require(
        cfg.num_heads % cfg.num_kv_heads == 0, f"NUM_KV_HEADS={cfg.num_kv_heads}: must divide NUM_HEADS={cfg.num_heads}"
    )
    require(
        cfg.rope_dims <= head_dim and cfg.rope_dims % 2 == 0,
        f"ROPE_DIMS={cfg.rope_dims}: must be even and <= the head dim MODEL_DIM/NUM_HEADS={head_dim}",
    )
    require(cfg.parallel_residual_start >= -1, f"PARALLEL_RESIDUAL_START={cfg.parallel_residual_start}: must be >= -1")
    require(cfg.gate_window <= cfg.model_dim, f"GATE_WINDOW={cfg.gate_window}: must be <= MODEL_DIM={cfg.model_dim}")
    require(int(cfg.mlp_mult * cfg.model_dim) > 0, f"MLP_MULT={cfg.mlp_mult}: hidden width must be > 0")


def check_depth(cfg: Config) -> dict:
    """The depth knobs (blocks, core, passes, progressive depth, lanes, XSA): the derived depth fields."""
    unique = cfg.num_unique_layers or cfg.num_layers
    loop_end = unique - 1 if cfg.loop_end == -1 else cfg.loop_end
    require(
        0 <= cfg.loop_start < unique,
        f"LOOP_START={cfg.loop_start}: must be in 0..{unique - 1} (NUM_UNIQUE_LAYERS={unique})",
    )
    require(cfg.loop_start <= loop_end < unique, f"LOOP_END={cfg.loop_end}: must be in LOOP_START..{unique - 1} or -1")
    repeats = core_repeats(unique, cfg.loop_start, loop_end, cfg.num_layers)
    require(
        -1 <= cfg.xsa_last_n <= cfg.num_layers,
        f"XSA_LAST_N={cfg.xsa_last_n}: must be -1 (all) or 0..NUM_LAYERS={cfg.num_layers}",
    )
    phases = parse_prog_depth(cfg.prog_depth) if cfg.prog_depth else [(1.0, repeats)]
    require(
        phases[-1][1] == repeats,
        f"PROG_DEPTH={cfg.prog_depth!r}: the last entry must be 1.0:{repeats} "
        f"(the passes R that NUM_LAYERS={cfg.num_layers} gives)",
    )
    eval_passes = cfg.eval_repeats or repeats
    # Lanes never merge back, so a looped core cannot hold their start: its later passes would run without them.
    most_passes = max([passes for _, passes in phases] + [eval_passes])
    start = cfg.parallel_lanes_start
    lanes_inside_looped_core = most_passes > 1 and cfg.loop_start < start <= loop_end
    require(
        start >= -1 and not lanes_inside_looped_core,  # -1 or past the last block: no lanes
        f"PARALLEL_LANES_START={start}: must be -1 or >= 0, not inside a core run {most_passes} times "
        "(lanes never merge back): at most LOOP_START or above LOOP_END",
    )
    return dict(
        repeats=repeats, eval_passes=eval_passes, unique_blocks=unique, core_last=loop_end, depth_phases=tuple(phases)
    )


def parse_ttt_phases(text: str) -> list[int]:
    """'1000,5000' -> [1000, 5000]: rising document counts > 0 (LoRA TTT's global phases)."""
    items = [item for item in re.split(r"[, ]+", text) if item]
    counts = [int(item) if item.isdecimal() else 0 for item in items]
    require(
        counts == sorted(set(counts)) and all(counts),
        f"TTT_PHASES={text!r}: rising document counts > 0 ('1000,5000'), with TTT_ADAPTER=lora",
    )
    return counts


# ----------------------------------------------------------------------------------------------
# Runtime
#
# Who and where this process is (rank, world size, device), the autocast it computes under, the logger (rank 0 writes
# the console and the run's log file) and the two collective helpers that make every rank act on the same numbers.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    log_path: Path | None = None

    def __post_init__(self):
        self.main, self.distributed = self.rank == 0, self.world_size > 1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def log(self, message: str, console: bool = True) -> None:
        if self.main and console:
            print(message, flush=True)
        if self.main and self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock(self) -> float:
        """time.perf_counter() once this rank's device has finished the work queued so far."""
        self.synchronize()
        return time.perf_counter()

    def agree_max(self, *values: float):
        """The maximum of each value over ranks, in one all-reduce: every rank acts on the same numbers."""
        if self.distributed:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            values = tuple(t.tolist())
        return values[0] if len(values) == 1 else values

    def all_equal(self, obj) -> bool:
        """Whether every rank holds the same (picklable) value."""
        gathered = [obj] * self.world_size
        if self.distributed:
            dist.all_gather_object(gathered, obj)
        return all(g == gathered[0] for g in gathered)


# ----------------------------------------------------------------------------------------------
# Depth plan
#
# The only place that knows about sharing and looping. U physical blocks; the core LOOP_START..LOOP_END is run R
# times, the blocks before it once at the start and those after it once at the end. A plan is one record per virtual
# layer (physical block, parameter row, XSA, parallel residual, norm scale, U-Net skip); the model iterates them.
# ----------------------------------------------------------------------------------------------


class Layer(NamedTuple):
    block: int  # physical block
    row: int  # row of the per-layer scales and residual mix (virtual position, or the block's index)
    xsa: bool  # exclusive self-attention
    parallel: bool  # attention and MLP read the same input (parallel residual)
    lanes: bool  # two residual lanes: attention reads lane 0 (the stream U-Net skips store and add to), the MLP lane 1
    norm_scale: float  # multiplies the block's normed inputs (LN_SCALE)
    skip_from: int  # the virtual layer whose output is added before this one (U-Net); -1 = none
    skip_slot: int  # row of the skip weights and gates used by that skip
    store: bool  # a later layer adds this layer's output


class Plan(NamedTuple):
    layers: tuple[Layer, ...]

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(layer.block for layer in self.layers)


def core_repeats(unique: int, loop_start: int, loop_end: int, num_layers: int) -> int:
    """R such that NUM_LAYERS = (U - core) + R * core; ConfigError naming the values that work."""
    core = loop_end - loop_start + 1
    outside = unique - core
    options = ", ".join(str(outside + r * core) for r in range(1, 5))
    require(
        num_layers > outside and (num_layers - outside) % core == 0,
        f"NUM_LAYERS={num_layers}: with "
        f"NUM_UNIQUE_LAYERS={unique} and core {loop_start}..{loop_end} it must be {options}, ...",
    )
    return (num_layers - outside) // core


def parse_prog_depth(text: str) -> list[tuple[float, int]]:
    """'0.4:2,0.65:3,1.0:4' -> [(0.4, 2), (0.65, 3), (1.0, 4)]; fractions rising, ending at 1.0."""
    try:
        phases = []
        for item in text.split(","):
            fraction, passes = item.split(":")
            phases.append((float(fraction), int(passes)))
    except ValueError:
        raise ConfigError(f"PROG_DEPTH={text!r}: expected 'f1:r1,f2:r2,...,1.0:R' (fraction:passes)") from None
    fracs = [f for f, _ in phases]
    require(
        0 < fracs[0] and fracs[-1] == 1.0 and all(a < b for a, b in zip(fracs, fracs[1:])),
        f"PROG_DEPTH={text!r}: fractions must rise strictly and end at 1.0",
    )
    require(all(r >= 1 for _, r in phases), f"PROG_DEPTH={text!r}: passes must be >= 1")
    return phases


def depth_phase(cfg: Config, t: float) -> int:
    """Core passes to use at run fraction t (all ranks use the same all-reduced t)."""
    return next((passes for frac, passes in cfg.depth_phases if t < frac), cfg.repeats)


def training_repeats(cfg: Config) -> list[int]:
    """Every pass count a training run uses, in order (one compiled/primed plan each)."""
    return [passes for _, passes in cfg.depth_phases]


def depth_plan(
    unique: int,
    loop_start: int,
    loop_end: int,
    repeats: int,
    xsa_last_n: int = 0,
    ln_scale: bool = False,
    parallel_start: int = -1,
    block_rows: bool = False,
    lanes_start: int = -1,
) -> Plan:
    core = list(range(loop_start, loop_end + 1))
    blocks = list(range(loop_start)) + core * repeats + list(range(loop_end + 1, unique))
    skip_source = {decoder: (encoder, slot) for slot, (encoder, decoder) in enumerate(unet_pairs(len(blocks)))}
    stores = {encoder for encoder, _ in skip_source.values()}
    xsa_from = 0 if xsa_last_n == -1 else len(blocks) - xsa_last_n
    layers = []
    for v, b in enumerate(blocks):
        skip_from, skip_slot = skip_source.get(v, (-1, -1))
        layer = Layer(
            block=b,
            row=b if block_rows else v,
            xsa=v >= xsa_from,
            parallel=0 <= parallel_start <= b,
            lanes=0 <= lanes_start <= b,
            norm_scale=1 / math.sqrt(b + 1) if ln_scale else 1.0,
            skip_from=skip_from,
            skip_slot=skip_slot,
            store=v in stores,
        )
        layers.append(layer)
    return Plan(tuple(layers))


def unet_pairs(depth: int) -> list[tuple[int, int]]:
    """(encoder, decoder) layer pairs: the first depth//2 layers store their output, the next add it back in reverse."""
    half = depth // 2
    return [(half - 1 - i, half + i) for i in range(half)]


def plan_for(cfg: Config, repeats: int) -> Plan:
    return depth_plan(
        cfg.unique_blocks,
        cfg.loop_start,
        cfg.core_last,
        repeats,
        xsa_last_n=cfg.xsa_last_n,
        ln_scale=cfg.ln_scale,
        parallel_start=cfg.parallel_residual_start,
        block_rows=cfg.layer_rows == "block",
        lanes_start=cfg.parallel_lanes_start,
    )


def max_depth(cfg: Config) -> int:
    """Virtual layers of the deepest plan a run uses (training phases and evaluation)."""
    return max(len(plan_for(cfg, passes).layers) for passes in training_repeats(cfg) + [cfg.eval_passes])


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the run fraction t in [0, 1]
#
# t = elapsed / MAX_WALLCLOCK_SECONDS with a cap, else step / ITERATIONS: one set of defaults fits 5 minutes on one
# GPU and 4 hours on eight (upstream's step counts, WARMDOWN_ITERS and MUON_MOMENTUM_WARMUP_STEPS, are not knobs).
# ----------------------------------------------------------------------------------------------


def training_seconds(cfg: Config) -> float:
    """The training clock's cap: MAX_WALLCLOCK_SECONDS less what GPTQ's calibration reserves."""
    return cfg.max_wallclock_seconds - cfg.export_reserve_seconds * cfg.gptq


def run_fraction(cfg: Config, step: int, elapsed_s: float) -> float:
    by_time = elapsed_s / training_seconds(cfg) if cfg.max_wallclock_seconds > 0 else 0.0
    by_step = step / cfg.iterations if cfg.iterations else 0.0
    return min(1.0, max(by_time, by_step))


def lr_multiplier(cfg: Config, t: float) -> float:
    """1 until the warmdown, then linear to 0 (or MIN_LR) at the end of the run (the cap or ITERATIONS)."""
    ramp = (1 - t) / cfg.warmdown_frac if cfg.warmdown_frac else 1.0
    return min(1.0, max(cfg.min_lr, ramp))


def muon_momentum(cfg: Config, t: float) -> float:
    ramp = t / cfg.muon_momentum_warmup_frac if cfg.muon_momentum_warmup_frac > 0 else 1.0
    return cfg.muon_momentum_warmup_start + min(1.0, ramp) * (cfg.muon_momentum - cfg.muon_momentum_warmup_start)


# ----------------------------------------------------------------------------------------------
# Optimizer
#
# Muon (momentum, then orthogonalize the update with a Newton-Schulz iteration) for the 2-D matrices of the blocks;
# Adam for embeddings, the head and every vector/scale. Muon's orthogonalization is split across ranks: each rank
# orthogonalizes every world_size-th matrix, one all-reduce of a flat buffer shares them (modded-nanogpt's idea).
# ----------------------------------------------------------------------------------------------


# Newton-Schulz coefficients (a, b, c) per iteration (past the end of a list its last repeats). quintic: Muon's one,
# fast rather than exact: 5 steps take singular values spanning 100x into ~[0.68, 1.2]; polar: Polar Express (Amsel
# et al. 2025; the 2026-04-23 record's five, to 4 decimals), minimax per step: ~[0.86, 1.14], then (15, -10, 3)/8 to 1.
NEWTON_SCHULZ = {
    "quintic": ((3.4445, -4.7750, 2.0315),),
    "polar": (
        (8.1566, -22.4833, 15.8788),
        (4.0429, -2.8089, 0.5000),
        (3.8917, -2.7725, 0.5061),
        (3.2858, -2.3681, 0.4645),
        (2.3465, -1.7098, 0.4232),
        (1.875, -1.25, 0.375),
    ),
}


def newton_schulz(grad: torch.Tensor, steps: int, eps: float = 1e-7, method: str = "quintic") -> torch.Tensor:
    """Approximately orthogonalize each matrix of `grad` (..., m, n): U S V^T -> U V^T, with quintic
    iterations (NEWTON_SCHULZ[method]) in bf16 on a GPU and in float32 on a CPU, whose bf16 matmuls are emulated and
    6-25x slower; the result is bf16. Batched: one call handles a stack of same-shape matrices."""
    coefficients = NEWTON_SCHULZ[method]
    x = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).bfloat16()


class Muon(torch.optim.Optimizer):
    """Rank r orthogonalizes matrices i % world_size == r, stacked by shape (one batched Newton-Schulz call per
    shape); a flat all-reduce shares the updates, scaled by sqrt(max(1, rows/cols)) as in the reference Muon."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        backend_steps: int,
        weight_decay: float,
        rank: int = 0,
        world_size: int = 1,
        row_normalize: bool = False,
        method: str = "quintic",
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                backend_steps=backend_steps,
                weight_decay=weight_decay,
                row_normalize=row_normalize,
                method=method,
            ),
        )
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            mine = [p for i, p in enumerate(params) if i % self.world_size == self.rank and p.grad is not None]
            updates = self.orthogonalized_updates(mine, group) if mine else {}
            if self.world_size > 1:  # every rank gets every update: one flat all-reduce (zeros where not its own)
                flat = torch.cat([self.flat_update(p, updates) for p in params])
                dist.all_reduce(flat)
                pieces = flat.split([p.numel() for p in params])
                updates = {id(p): piece.view_as(p) for p, piece in zip(params, pieces)}
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [updates[id(p)].to(p.dtype) for p in params], alpha=-group["lr"])

    def orthogonalized_updates(self, mine: list[torch.Tensor], group: dict) -> dict[int, torch.Tensor]:
        """This rank's matrices: Nesterov momentum, orthogonalized in one batched call per shape; by id(param)."""
        momentum, grads = group["momentum"], [p.grad for p in mine]
        buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in mine]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        nesterov = torch._foreach_add(grads, buffers, alpha=momentum)
        if group["row_normalize"]:  # MuonEq-R: each row of the update gets the same norm before orthogonalizing
            nesterov = [g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype) for g in nesterov]
        updates = {}
        for rows, cols in dict.fromkeys(p.shape for p in mine):
            same_shape = [i for i, p in enumerate(mine) if p.shape == (rows, cols)]
            stack = torch.stack([nesterov[i] for i in same_shape])
            ortho = newton_schulz(stack, group["backend_steps"], method=group["method"])
            ortho = ortho * max(1.0, rows / cols) ** 0.5
            updates.update(zip((id(mine[i]) for i in same_shape), ortho.unbind(0)))
        return updates

    @staticmethod
    def flat_update(p: torch.Tensor, updates: dict[int, torch.Tensor]) -> torch.Tensor:
        if id(p) in updates:
            return updates[id(p)].flatten()
        return torch.zeros(p.numel(), device=p.device, dtype=torch.bfloat16)


def build_optimizers(cfg: Config, model: "GPT", rank: int, world_size: int, fused: bool) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' linear maps; AdamW (decoupled decay, p *= 1 - lr * weight_decay) for the tied embedding
    and every other parameter (vectors, scales, per-layer rows, gates)."""
    matrices = [m.weight for m in model.blocks.modules() if isinstance(m, CastedLinear)]
    embed = [model.tok_emb.weight]
    named = {id(p) for p in matrices + embed}
    scalars = [p for p in model.parameters() if id(p) not in named]
    groups = [
        dict(params=embed, lr=cfg.tied_embed_lr, weight_decay=cfg.embed_wd),
        dict(params=scalars, lr=cfg.scalar_lr, weight_decay=cfg.adam_wd),
    ]
    adam = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    muon = Muon(
        matrices,
        cfg.matrix_lr,
        cfg.muon_momentum,
        cfg.muon_backend_steps,
        cfg.muon_weight_decay,
        rank,
        world_size,
        row_normalize=cfg.muon_row_normalize,
        method=cfg.muon_ns,
    )
    for group in adam.param_groups + muon.param_groups:
        group["base_lr"] = group["lr"]
    return [adam, muon]


# ----------------------------------------------------------------------------------------------
# Data
#
# The challenge's shard format: a 256 x int32 little-endian header (magic 20240520, version 1, token count) followed
# by the tokens as little-endian uint16. Training draws windows of all shards in a seeded shuffled order, each rank a
# disjoint share of every step, so any world size works.
# ----------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1  # every document starts with it (data/build_shards.py; the challenge's SentencePiece models)


def read_shard_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    require(
        path.is_file(), f"{path}: {'a folder' if path.is_dir() else 'not a regular file'}, not a token shard", DataError
    )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    require(
        header.size == HEADER_INTS,
        f"{path}: truncated header ({header.size * 4} of {HEADER_INTS * 4} bytes)",
        DataError,
    )
    require(
        header[0] == SHARD_MAGIC and header[1] == SHARD_VERSION,
        f"{path}: not a token shard (magic {header[0]}, version {header[1]}; expected {SHARD_MAGIC}, {SHARD_VERSION})",
        DataError,
    )
    count = int(header[2])
    require(count != 0, f"{path}: empty shard (0 tokens)", DataError)
    size = path.stat().st_size
    require(
        size == HEADER_INTS * 4 + 2 * count,
        f"{path}: size {size} bytes does not match its header ({count} "
        f"tokens -> {HEADER_INTS * 4 + 2 * count} bytes); truncated or corrupt",
        DataError,
    )
    return count


def shard_files(folder: Path, split: str) -> list[Path]:
    """fineweb_<split>_N.bin in `folder`, sorted; split "val" does not take the byte sidecars (split "val_bytes")."""
    named = folder.glob(f"fineweb_{split}_*.bin")
    return sorted(p for p in named if re.fullmatch(rf"fineweb_{split}_\d+\.bin", p.name))


def find_shards(data_path: str, split: str) -> list[Path]:
    folder = Path(data_path)
    require(folder.is_dir(), f"DATA_PATH={data_path}: folder not found", DataError)
    shards = shard_files(folder, split)
    require(len(shards) > 0, f"DATA_PATH={data_path}: no fineweb_{split}_*.bin shards in it", DataError)
    for shard in shards:
        read_shard_header(shard)
    return shards


def check_shard_tokens(path: Path, vocab_size: int) -> None:
    """Refuse a shard holding a token id the model has no row for (built with another tokenizer) before training, not
    when a batch happens to draw it: a vectorized max over the memory-mapped tokens, ~0.1 s per 100M tokens."""
    top = int(map_shard(path).max())
    require(
        top < vocab_size,
        f"{path}: token id {top} >= VOCAB_SIZE={vocab_size}; the shards were built with another tokenizer",
        DataError,
    )


def map_shard(path: Path) -> np.ndarray:
    """A shard's tokens, memory-mapped (pages are read when a window touches them; validation copies them whole)."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(read_shard_header(path),))


class ShuffledLoader:
    """This rank's batches: `seqs` sequences of `seq_len` inputs (targets one token later), made by prefetch() while
    the GPU runs the last micro-step. Each epoch cuts every shard into windows of seq_len + 1 tokens from a random
    phase and draws all shards' windows in one permutation (long documents such as books would otherwise fill a
    batch). A micro-step takes the next world_size * seqs windows, rank r the r-th share: disjoint ranks, any number
    of shards for any number of ranks; the order follows from the seed and the batches read (a resume reads on)."""

    def __init__(
        self,
        paths: list[Path],
        rank: int,
        world_size: int,
        seqs: int,
        seq_len: int,
        device,
        seed: int,
        vocab_size: int = 65536,
    ):
        self.rank, self.world_size, self.seqs, self.seq_len, self.device = rank, world_size, seqs, seq_len, device
        self.vocab_size = vocab_size  # token ids >= it are refused as batches are read, not minutes later in the model
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shards, self.seed = [map_shard(p) for p in paths], seed
        if all(len(t) < seq_len + 1 for t in self.shards):
            raise DataError(f"{paths[0].parent}: no train shard holds TRAIN_SEQ_LEN + 1 = {seq_len + 1} tokens")
        self._start_epoch(0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch prepared by prefetch(), else a fresh one."""
        batch, self._pending = self._pending or self._load(), None
        return batch

    def prefetch(self) -> None:
        self._pending = self._pending or self._load()

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._windows(self.world_size * self.seqs)[self.rank * self.seqs : (self.rank + 1) * self.seqs]
        shard = np.searchsorted(self.first, ids, side="right") - 1
        starts = self.phases[shard] + (ids - self.first[shard]) * self.seq_len
        rows = np.stack(
            [self.shards[s][a : a + self.seq_len + 1] for s, a in zip(shard, starts)]
        )  # [seqs, seq_len + 1]
        require(
            rows.max() < self.vocab_size,
            f"train shards: token id {int(rows.max())} >= VOCAB_SIZE="
            f"{self.vocab_size}; the shards were built with another tokenizer",
            DataError,
        )
        rows = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def _start_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        self.phases = np.array([rng.integers(0, max(1, min(self.seq_len, len(t) - self.seq_len))) for t in self.shards])
        counts = [max(0, (len(t) - 1 - p) // self.seq_len) for t, p in zip(self.shards, self.phases)]
        self.first = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first window
        self.order = rng.permutation(int(self.first[-1]))
        self.epoch, self.position = epoch, 0

    def skip(self, batches: int) -> None:
        """RESUME: pass over the batches the run has trained on (the position follows from the step count)."""
        for _ in range(batches):
            self._windows(self.world_size * self.seqs)

    def _windows(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.position == len(self.order):
                self._start_epoch(self.epoch + 1)
            parts.append(part := self.order[self.position : self.position + n])
            self.position += len(part)
            n -= len(part)
        return np.concatenate(parts)


def make_train_loader(cfg: Config, rt: Runtime) -> ShuffledLoader:
    """This rank's training batches from DATA_PATH's train shards."""
    shape = (rt.rank, rt.world_size, cfg.micro_batch_seqs, cfg.train_seq_len, rt.device)
    return ShuffledLoader(find_shards(cfg.data_path, "train"), *shape, cfg.seed, vocab_size=cfg.vocab_size)


def load_val_tokens(cfg: Config) -> torch.Tensor:
    tokens = np.concatenate([map_shard(p) for p in find_shards(cfg.data_path, "val")])
    require(
        (top := int(tokens.max())) < cfg.vocab_size,
        f"DATA_PATH={cfg.data_path}: validation token id {top} >= "
        f"VOCAB_SIZE={cfg.vocab_size}; the shards were built with another tokenizer",
        DataError,
    )
    return torch.from_numpy(tokens.astype(np.int32))


def sidecar_path(val_shard: Path) -> Path:
    """Where a CaseOps validation shard's byte sidecar lies: fineweb_val_bytes_N.bin beside fineweb_val_N.bin."""
    return val_shard.with_name(val_shard.name.replace("fineweb_val_", "fineweb_val_bytes_", 1))


def load_val_sidecars(cfg: Config) -> np.ndarray | None:
    """The validation tokens' byte sidecars, concatenated as the tokens are (data/build_shards.py --transform caseops
    writes them: per token, the bytes of the original text it stands for), or None when DATA_PATH has none."""
    shards = find_shards(cfg.data_path, "val")
    sidecars = [sidecar_path(shard) for shard in shards]
    if not any(path.exists() for path in sidecars):
        return None
    for shard, sidecar in zip(shards, sidecars):
        require(sidecar.is_file(), f"{sidecar}: byte sidecar missing beside {shard.name} (the others have theirs)",
                DataError)  # fmt: skip
        count, tokens = read_shard_header(sidecar), read_shard_header(shard)
        require(count == tokens, f"{sidecar}: {count} entries for the {tokens} tokens of {shard.name}", DataError)
    return np.concatenate([map_shard(sidecar) for sidecar in sidecars])


CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")  # TITLE, ALLCAPS, CAPNEXT, ESC (data/caseops.py)


def caseops_operator_ids(sp) -> list[int]:
    """The ids of the CaseOps operator pieces in a tokenizer (all four, or none: not a CaseOps tokenizer)."""
    ids = [sp.piece_to_id(op) for op in CASEOPS_OPERATORS]
    return [] if any(i == sp.unk_id() for i in ids) else ids


def check_sidecars_match(cfg: Config, sp) -> None:
    """A CaseOps tokenizer scores through the byte sidecars (its operator pieces stand for no text), and sidecars
    belong to a CaseOps tokenizer: anything else would count the wrong bytes."""
    has_sidecars = any(sidecar_path(p).exists() for p in find_shards(cfg.data_path, "val"))
    caseops = bool(caseops_operator_ids(sp))
    require(
        has_sidecars or not caseops,
        f"TOKENIZER_PATH={cfg.tokenizer_path}: a CaseOps tokenizer, but DATA_PATH={cfg.data_path} has no byte "
        "sidecars (fineweb_val_bytes_*.bin): build it with data/build_shards.py --transform caseops",
        DataError,
    )
    require(
        caseops or not has_sidecars,
        f"DATA_PATH={cfg.data_path}: has CaseOps byte sidecars, but TOKENIZER_PATH={cfg.tokenizer_path} has no "
        "CaseOps operator pieces",
        DataError,
    )


def load_tokenizer(cfg: Config):
    import sentencepiece as spm

    require(
        Path(cfg.tokenizer_path).is_file(),
        f"TOKENIZER_PATH={cfg.tokenizer_path}: "
        f"{'a folder, not a SentencePiece .model file' if Path(cfg.tokenizer_path).is_dir() else 'file not found'}",
        DataError,
    )
    try:
        sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer_path)
    except Exception as exc:
        raise DataError(f"TOKENIZER_PATH={cfg.tokenizer_path}: not a SentencePiece model ({exc})") from None
    require(
        sp.vocab_size() == cfg.vocab_size,
        f"VOCAB_SIZE={cfg.vocab_size}: the tokenizer {cfg.tokenizer_path} has {sp.vocab_size()} pieces",
        DataError,
    )
    return sp


# ----------------------------------------------------------------------------------------------
# Model
#
# A GPT whose blocks may be shared across virtual layers. Per-virtual-layer parameters (loop embedding, attention/MLP
# scales, residual mix, U-Net skip weights) are rows of a few tensors indexed by virtual position, so every plan
# touches the same parameter objects and parameters grow with passes only by those rows. Attention: GQA + RoPE +
# QK-RMSNorm + per-head query gain; optional XSA (exclusive self-attention: each head's output loses its component
# along the token's own value vector). MLP: relu^2 (or leaky_relu(0.5)^2). The token embedding is the output head
# (tied); logits are soft-capped with tanh.
# ----------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class AttentionMask(NamedTuple):
    """What a query may see, in the form the attention kernel in use takes. kind "causal": every earlier token (no
    data); "dense": SDPA's boolean [B, 1, T, T] mask (eager blocks); "flex": a flex_attention BlockMask (compiled
    blocks); "varlen": FlashAttention 3's int32 cu_seqlens of the batch flattened to B*T rows (compiled blocks)."""

    kind: str
    data: torch.Tensor | BlockMask | None = None


CAUSAL = AttentionMask("causal")


class Blocks(enum.Enum):
    """Which modules run the blocks: EAGER the plain ones (GPTQ's hooks see every call; the CPU); COMPILED the
    fixed-shape compiled twins (training, evaluation); DYNAMIC the twins whose shapes may change (LoRA TTT and its
    global phases). Without compilation every choice runs the plain modules."""

    EAGER = "eager"
    COMPILED = "compiled"
    DYNAMIC = "dynamic"


class LoraAdapter(NamedTuple):
    """Test-time LoRA (Hu et al. 2021), one adapter per batch row: for every linear map a pair (A [rows, r, in],
    B [rows, out, r]) adding (x A^T) B^T. `blocks` holds a dict per physical block ("attn.c_q", ..., "mlp.proj"),
    `head` the output head's pair."""

    blocks: tuple
    head: tuple


class CastedLinear(nn.Linear):
    """fp32 master weight, computed in the input's dtype."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, lora: tuple | None = None) -> torch.Tensor:
        return low_rank(F.linear(x, self.weight.to(x.dtype)), x, lora)


def low_rank(y: torch.Tensor, x: torch.Tensor, lora: tuple | None) -> torch.Tensor:
    """y plus a LoRA pair's delta (x A^T) B^T, one (A, B) per batch row; no pair: y."""
    if lora is None:
        return y
    a, b = lora
    return y + (x @ a.to(x.dtype).mT) @ b.to(x.dtype).mT


def lora_pair(adapter: dict | None, name: str) -> tuple | None:
    """The LoRA pair of one linear map of a block, if the block runs with an adapter."""
    return None if adapter is None else adapter[name]


def rotary_tables(seq_len: int, rope_dims: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos()[None, :, None], angles.sin()[None, :, None]  # for (B, T, H, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * cos.size(-1) dims of each head (all of them unless ROPE_DIMS is set)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, qk_gain_init: float, any_xsa: bool, fa3=None, gate=(0, 0)):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.any_xsa = heads, kv_heads, dim // heads, any_xsa
        self.fa3 = fa3  # FlashAttention 3's module (flash_attn_func, flash_attn_varlen_func), or None: PyTorch's
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain_init))
        # ATTN_GATE: gate = (scale s, window); s > 0 gives each head a zero-init gate (the 2026-04-27 record's s = 0.5)
        self.gate_scale, self.gate = gate[0], nn.Parameter(torch.zeros(heads, gate[1])) if gate[0] else None

    def forward(self, x, rope, xsa: torch.Tensor, mask: AttentionMask = CAUSAL, adapter: dict | None = None):
        """`xsa` is a 0/1 tensor (not a Python bool), so layers with and without XSA share one compiled graph."""
        B, T, _ = x.shape
        q = self.c_q(x, lora_pair(adapter, "attn.c_q")).view(B, T, self.heads, self.head_dim)
        k = self.c_k(x, lora_pair(adapter, "attn.c_k")).view(B, T, self.kv_heads, self.head_dim)
        v = self.c_v(x, lora_pair(adapter, "attn.c_v")).view(B, T, self.kv_heads, self.head_dim)
        # everything in the projections' own (B, T, H, D) layout; PyTorch's attention kernels get (B, H, T, D) views
        q, k = apply_rotary(rms_norm(q), *rope), apply_rotary(rms_norm(k), *rope)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = self.attend(q, k, v, mask)
        if self.any_xsa:  # each head's output loses its component along its own token's value vector
            y = y.reshape(B, T, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            own = v[:, :, :, None]  # y minus its projection on v: (y . v) / (v . v) v, no normalized copy of v
            share = (y * own).sum(-1, keepdim=True) / (own * own).sum(-1, keepdim=True).clamp_min(1e-24)
            y = y - xsa.to(y.dtype) * share * own
        if self.gate is not None:  # ATTN_GATE: a per-head gate read from this token's input alone
            g = torch.sigmoid(self.gate_scale * x[..., : self.gate.size(1)] @ self.gate.to(x.dtype).T)
            y = y.reshape(B, T, self.heads, self.head_dim) * g[..., None]
        return self.proj(y.reshape(B, T, -1), lora_pair(adapter, "attn.proj"))

    def attend(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        """Causal attention of (B, T, H, D) queries over (B, T, H_kv, D) keys and values (GQA), within `mask`."""
        if mask.kind in ("flex", "dense") or self.fa3 is None:  # PyTorch's kernels, on (B, H, T, D) views
            q, k, v, gqa = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.heads != self.kv_heads
            if mask.kind == "flex":
                y = flex_attention(q, k, v, block_mask=mask.data, enable_gqa=gqa)
            elif mask.kind == "dense":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.data, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return y.transpose(1, 2)
        # FlashAttention 3, as the records call it: bf16 in this (B, T, H, D) layout, GQA by itself
        B, T, _, D = q.shape
        q, k, v = (t.bfloat16() for t in (q, k, v))
        if mask.kind == "varlen":  # the batch flattened to (B*T, H, D); segments from GPT.attention_mask
            cu, flat = mask.data, [t.flatten(0, 1) for t in (q, k, v)]
            y = self.fa3.flash_attn_varlen_func(
                *flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, causal=True
            )
        else:
            y = self.fa3.flash_attn_func(q, k, v, causal=True)
        y = y[0] if isinstance(y, tuple) else y  # some FA3 builds return (out, logsumexp)
        return y.reshape(B, T, -1, D)


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, act: str):
        super().__init__()
        hidden = int(mult * dim)
        self.fc, self.proj, self.act = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True), act

    def forward(self, x: torch.Tensor, adapter: dict | None = None) -> torch.Tensor:
        h = self.fc(x, lora_pair(adapter, "mlp.fc"))
        h = F.leaky_relu(h, 0.5) if self.act == "leaky_relu2" else F.relu(h)
        return self.proj(h.square(), lora_pair(adapter, "mlp.proj"))


class Block(nn.Module):
    """One physical block; the per-layer rows and constants it uses are passed in by the model."""

    def __init__(self, cfg: Config, fa3=None):
        super().__init__()
        any_xsa, gate = cfg.xsa_last_n != 0, (cfg.attn_gate, cfg.gate_window)
        self.attn = Attention(cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_gain_init, any_xsa, fa3, gate)
        self.mlp = MLP(cfg.model_dim, cfg.mlp_mult, cfg.mlp_act)

    def forward(self, x, x0, rows: tuple, rope, consts, mask: AttentionMask = CAUSAL, adapter=None, lanes=None):
        """rows = (residual mix, attention scale, MLP scale) of this layer; consts = (norm scale, parallel 0/1,
        xsa 0/1) as a tensor: per-layer values, one graph. `lanes`: (lane 1, lane mix) on a two-lane layer."""
        mix, attn_scale, mlp_scale = rows
        scale, parallel = consts[0].to(x.dtype), consts[1].to(x.dtype)
        lane0, x = x, mix[0] * x + mix[1] * x0
        a = attn_scale * self.attn(rms_norm(x) * scale, rope, consts[2], mask, adapter)
        if lanes is None:
            mlp_in = x + (1 - parallel) * a  # parallel residual: the MLP reads x too
        else:
            mlp_in = lanes[0]
        m = mlp_scale * self.mlp(rms_norm(mlp_in) * scale, adapter)
        if lanes is None:
            return x + a + m
        # a lane layer (x is lane 0): lane j = w[0, j] * lane j + w[1, j] * attention + w[2, j] * MLP
        lane1, w = lanes
        return w[0, 0] * lane0 + w[1, 0] * a + w[2, 0] * m, w[0, 1] * lane1 + w[1, 1] * a + w[2, 1] * m


@cache
def layer_consts(plan: Plan, device: torch.device) -> torch.Tensor:
    """[depth, 3] (norm scale, parallel, xsa) of a plan, built once per plan and device."""
    rows = [[layer.norm_scale, float(layer.parallel), float(layer.xsa)] for layer in plan.layers]
    return torch.tensor(rows, device=device)


class GPT(nn.Module):
    """With `compile`, compiled twins of every block (fixed shapes; and dynamic ones for LoRA TTT) and of the loss
    head share the blocks' parameters; `blocks` (Blocks) picks which run. `fa3`: FlashAttention 3 for attention."""

    def __init__(self, cfg: Config, compute_dtype: torch.dtype = torch.float32, compile: bool = False, fa3=False):
        super().__init__()
        self.cfg, self.compute_dtype, self.fa3 = cfg, compute_dtype, fa3
        unique, depth, dim = cfg.unique_blocks, max_depth(cfg), cfg.model_dim
        rows = unique if cfg.layer_rows == "block" else depth
        self.tok_emb = nn.Embedding(cfg.vocab_size, dim)  # also the output head (tied)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        fa3_module = importlib.import_module("flash_attn_interface") if fa3 else None
        self.blocks = nn.ModuleList(Block(cfg, fa3_module) for _ in range(unique))
        # Rows indexed by virtual position (or by block with LAYER_ROWS=block), sized for the deepest plan.
        self.loop_emb = nn.Parameter(torch.zeros(depth, dim)) if cfg.loop_embed else None  # zero-init
        self.attn_scale = nn.Parameter(torch.ones(rows, dim))
        self.mlp_scale = nn.Parameter(torch.ones(rows, dim))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(rows, dim), torch.zeros(rows, dim)], dim=1))
        self.skip_weight = nn.Parameter(torch.ones(max(1, depth // 2), dim))
        self.skip_gate = nn.Parameter(torch.zeros(max(1, depth // 2), dim)) if cfg.skip_gates_enabled else None
        self.lane_mix = None  # Block's lane weights w per row, the 2026-04-27 record's init
        if 0 <= cfg.parallel_lanes_start < unique:
            self.lane_mix = nn.Parameter(torch.tensor([[1.1, 1.1], [1.0, 1.0], [1.0, 1.0]]).repeat(rows, 1, 1))
        self.smear = nn.Parameter(torch.zeros(1 + cfg.gate_window)) if cfg.smear_gate else None  # (lambda, w)
        if cfg.ortho_init:
            for module in self.blocks.modules():
                if isinstance(module, CastedLinear) and not module.zero_init:
                    nn.init.orthogonal_(module.weight)
        self.compile_twins(compile)

    def compile_twins(self, compile: bool) -> None:
        """Each block and the loss head compiled, not the whole model: 9% faster steps on one H100 (the whole graph
        fused all layers' residual-mix gradients into slow reductions) and 2-3x faster compilation; one block graph
        serves every block and plan, as per-layer values are tensors (docs/perf.md). Plain lists, not submodules:
        the twins share the blocks' parameters. LoRA TTT's batches (and its phases' last steps) change shape: its
        own twins, whose shapes turn dynamic once seen to change (check_eval_budget primes them)."""
        self.compiled_blocks, self.dynamic_blocks = [], []
        self.block_mask, self.head_loss = create_block_mask, softcap_cross_entropy
        self.glue = PLAIN_GLUE  # the work between the blocks: (smear and norm, skip mix, final norm, grad sum)
        if not compile:
            return
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled_blocks = [torch.compile(b, dynamic=False, fullgraph=True) for b in self.blocks]
        self.dynamic_blocks = [torch.compile(b, dynamic=None, fullgraph=True) for b in self.blocks]
        self.block_mask = torch.compile(create_block_mask)  # compiled: no B*T*T mask is materialized
        self.head_loss = torch.compile(softcap_cross_entropy, dynamic=False, fullgraph=True)
        # the glue between the blocks in a few fused kernels, not eager ops (5.8% of a step: docs/perf.md)
        self.glue = tuple(torch.compile(f, dynamic=False, fullgraph=True) for f in PLAIN_GLUE)

    def block_modules(self, blocks: Blocks) -> tuple[list, bool]:
        """The modules that run the blocks, and whether they are the plain (eager) ones."""
        twins = {Blocks.COMPILED: self.compiled_blocks, Blocks.DYNAMIC: self.dynamic_blocks}.get(blocks)
        if twins:
            return twins, False
        return list(self.blocks), True

    def attention_mask(self, input_ids: torch.Tensor, eager: bool, adapter: LoraAdapter | None) -> AttentionMask:
        """CAUSAL, or with DOC_MASK each token's own document only (each starts with a BOS), in the form the blocks'
        kernel takes. A LoRA row is one document already: causal. Eager blocks: SDPA's boolean mask (flex has no CPU
        backward); compiled ones: FA3's varlen segments when installed, else a flex block mask (fused; skips whole
        blocks)."""
        if not self.cfg.doc_mask or adapter is not None:
            return CAUSAL
        if self.fa3 and not eager:
            return AttentionMask("varlen", varlen_segments(input_ids))
        if eager:
            return AttentionMask("dense", document_mask(input_ids))
        doc, T = torch.cumsum(input_ids == BOS_ID, 1), input_ids.size(1)  # each token's document: BOSes up to it

        def same_document(b, h, q, k):
            return (q >= k) & (doc[b, q] == doc[b, k])

        return AttentionMask("flex", self.block_mask(same_document, len(doc), None, T, T, device=doc.device))

    def hidden(self, input_ids, plan: Plan, blocks: Blocks = Blocks.COMPILED, adapter: LoraAdapter | None = None):
        dt = self.compute_dtype
        modules, eager = self.block_modules(blocks)
        mask = self.attention_mask(input_ids, eager, adapter)
        # fixed shapes: the compiled glue between the blocks (the plain functions without compile)
        smear_norm, mix, norm, grad_sum = self.glue if blocks is Blocks.COMPILED else PLAIN_GLUE
        x = smear_norm(self.tok_emb(input_ids), input_ids, self.smear, dt)
        # x0 feeds every layer: its gradients summed in one pass, not autograd's pairwise adds (eager: docs/perf.md)
        fanned = Fanout.apply(x, len(plan.layers) + 1, grad_sum)
        x, outputs, lane1 = fanned[0], {}, None
        head_dim = self.cfg.model_dim // self.cfg.num_heads
        rope = rotary_tables(input_ids.size(1), self.cfg.rope_dims or head_dim, self.cfg.rope_base, x.device)
        consts = layer_consts(plan, x.device)
        for v, layer in enumerate(plan.layers):
            if layer.lanes and lane1 is None:  # the split: x is lane 0 from here on
                lane1 = x
            if layer.skip_from >= 0:
                gate = None if self.skip_gate is None else self.skip_gate[layer.skip_slot]
                x = mix(x, outputs.pop(layer.skip_from), self.skip_weight[layer.skip_slot], gate)
            if self.loop_emb is not None:
                x = x + self.loop_emb[v].to(dt)
            r = layer.row
            rows = (self.resid_mix[r].to(dt), self.attn_scale[r].to(dt), self.mlp_scale[r].to(dt))
            lanes = (lane1, self.lane_mix[r].to(dt)) if layer.lanes else None
            block_adapter = None if adapter is None else adapter.blocks[layer.block]
            out = modules[layer.block](x, fanned[v + 1], rows, rope, consts[v], mask, block_adapter, lanes)
            if layer.lanes:
                x, lane1 = out
            else:
                x = out
            if layer.store:
                outputs[v] = x
        # A plan too shallow to use a tensor still touches it (zero gradient), so DDP needs no
        # find_unused_parameters and every phase of a progressive run trains the same parameters.
        if len(plan.layers) < 2:
            x = x + 0 * self.skip_weight[0].to(dt)
            if self.skip_gate is not None:
                x = x + 0 * self.skip_gate[0].to(dt)
        return norm(x, lane1)

    def logits(self, input_ids, plan: Plan, blocks: Blocks = Blocks.COMPILED, adapter: LoraAdapter | None = None):
        """Evaluation runs compiled blocks if any (minutes of forwards): score_windows keeps one shape, one compile."""
        h = self.hidden(input_ids, plan, blocks, adapter)
        head_lora = None if adapter is None else adapter.head
        return softcap_logits(h, self.tok_emb.weight, self.cfg.logit_softcap, head_lora)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, plan: Plan) -> torch.Tensor:
        return self.head_loss(self.hidden(input_ids, plan), self.tok_emb.weight, target_ids, self.cfg.logit_softcap)


def smear_and_norm(x: torch.Tensor, input_ids: torch.Tensor, smear: torch.Tensor | None, dtype: torch.dtype):
    """The token embeddings x plus, with SMEAR_GATE (smear: lambda, w), the previous token's through a learned gate
    (modded-nanogpt, as in the 2026-04-16 record), masked at a BOS (the 2026-04-27 record's fix: no document sees
    the last); RMS-normed, in the blocks' dtype."""
    if smear is not None:
        lam, w = smear[0], smear[1:]
        gate = lam * torch.sigmoid(x[:, 1:, : len(w)] @ w) * (input_ids[:, 1:] != BOS_ID)
        x = torch.cat([x[:, :1], x[:, 1:] + gate[..., None] * x[:, :-1]], dim=1)
    return rms_norm(x).to(dtype)


class Fanout(torch.autograd.Function):
    """x to n consumers as n aliases of it; backward sums their gradients with `summed` (compiled: one kernel that
    reads each once) where autograd would add them pairwise, each add a kernel of its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, summed) -> tuple:
        ctx.summed = summed
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        return ctx.summed([g for g in grads if g is not None]), None, None


def sum_tensors(tensors: list) -> torch.Tensor:
    return sum(tensors[1:], tensors[0])  # Python's sum from the first tensor: no 0 + to start


def mix_skip(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """U-Net skip: added with a learned per-channel weight, or, with SKIP_GATES_ENABLED, mixed in
    through a sigmoid gate (zero-init: half the weighted skip, half the stream). Weight and gate in x's dtype."""
    skip = weight.to(x.dtype) * skip
    return x + skip if gate is None else torch.lerp(skip, x, torch.sigmoid(gate.to(x.dtype)))


def final_norm(x: torch.Tensor, lane1: torch.Tensor | None) -> torch.Tensor:
    return rms_norm(x if lane1 is None else 0.5 * (x + lane1))  # two lanes: their mean


PLAIN_GLUE = (smear_and_norm, mix_skip, final_norm, sum_tensors)  # the work between the blocks, uncompiled


def document_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean [B, 1, T, T] mask: each token sees earlier tokens of its own document (BOSes up to it)."""
    doc = torch.cumsum(input_ids == BOS_ID, 1)
    return (doc[:, None, :, None] == doc[:, None, None, :]).tril()


def varlen_segments(input_ids: torch.Tensor) -> torch.Tensor:
    """FA3 varlen's cu_seqlens for a batch flattened to B*T rows: every segment's start (each row's, each BOS's), then
    B*T, padded with B*T (empty segments) to a multiple of 64 as the 2026-04-27 record does: a new count is a new
    shape for the compiled blocks (dynamic=False; compile_stats counts recompiles). nonzero syncs: its size is data."""
    starts = F.pad(input_ids[:, 1:] == BOS_ID, (1, 0), value=True).flatten().nonzero()[:, 0].int()
    padded = -(-(len(starts) + 1) // 64) * 64
    return F.pad(starts, (0, padded - len(starts)), value=input_ids.numel())


def softcap_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float, lora: tuple | None = None) -> torch.Tensor:
    logits = low_rank(F.linear(h, weight.to(h.dtype)), h, lora).float()
    return softcap * torch.tanh(logits / softcap)


class SoftcapCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of softcapped logits, whose forward also forms the logits' gradient (softmax minus
    one-hot, times the softcap's slope 1 - (z / softcap)^2) in the pass that reads them, saved in the matmuls' dtype:
    the [tokens, vocab] logits are read once, and the backward is the two matmuls (docs/perf.md)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
        z = softcap_logits(h, weight, softcap)  # h: [tokens, dim], weight: h's dtype
        lse, targets = torch.logsumexp(z, dim=-1, keepdim=True), targets[:, None]
        hit = torch.arange(z.shape[-1], device=z.device) == targets
        dz = (torch.exp(z - lse) - hit.float()) * (1 - (z / softcap).square()) / len(z)
        ctx.save_for_backward(h, weight, dz.to(h.dtype))
        return (lse - z.gather(1, targets)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, dz = ctx.saved_tensors
        dz = dz * grad.to(dz.dtype)
        return dz @ weight, dz.t() @ h, None, None


def softcap_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Training's loss, its logits' gradient formed in the forward (autograd keeps the weight's cast to h's dtype)."""
    return SoftcapCrossEntropy.apply(h.flatten(0, -2), weight.to(h.dtype), targets.reshape(-1), softcap)


# ----------------------------------------------------------------------------------------------
# Evaluation
#
# val_bpb = (sum of CE in nats / ln 2) / (sum of UTF-8 bytes of the scored tokens). Byte counts follow the challenge
# exactly: a piece's bytes without its leading "▁" (byte-fallback pieces 1, control/unknown/unused 0) plus 1 for the
# leading space unless the previous token is a control, unknown or unused id. Scoring runs over windows of fixed
# length: each window scores its targets from `score_from` on, and the window plan guarantees each target is scored
# exactly once: round trip, sliding window and SGD test-time training; LoRA TTT's windows stay inside documents.
# ----------------------------------------------------------------------------------------------


class ByteTables(NamedTuple):
    """What each scored token counts toward val_bpb's bytes: from its piece (the challenge's rule), or, for text
    transformed before it was tokenized (CaseOps), the original text's bytes of each validation token (a sidecar)."""

    base_bytes: torch.Tensor  # int16 [V]
    leading_space: torch.Tensor  # bool [V]
    boundary: torch.Tensor  # bool [V]: control, unknown or unused
    per_token: torch.Tensor | None = None  # int32 [validation tokens]: the sidecar, or None: bytes from the pieces

    def to(self, device) -> "ByteTables":
        return ByteTables(*(None if t is None else t.to(device) for t in self))


def byte_tables(sp, vocab_size: int) -> ByteTables:
    base, space, boundary = np.zeros(vocab_size, np.int16), np.zeros(vocab_size, bool), np.ones(vocab_size, bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)  # a byte-fallback piece is <0xNN>, no "▁"
        space[i] = piece.startswith("▁")
        base[i] = 1 if sp.is_byte(i) else len(piece.removeprefix("▁").encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def token_bytes(tables: ByteTables, prev_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    return tables.base_bytes[target_ids].long() + (tables.leading_space[target_ids] & ~tables.boundary[prev_ids]).long()


def val_byte_tables(cfg: Config, rt: Runtime, val_tokens: torch.Tensor) -> ByteTables:
    """The byte tables of this run's validation split: the tokenizer's pieces, with the CaseOps sidecars when DATA_PATH
    has them, each checked against the pieces (equal everywhere but at the operators, which count 0 or, escaped, 3)."""
    sp = load_tokenizer(cfg)
    tables = byte_tables(sp, cfg.vocab_size)
    sidecar = load_val_sidecars(cfg)
    if sidecar is None:
        total = token_bytes(tables, val_tokens[:-1].long().cpu(), val_tokens[1:].long().cpu()).sum()
        rt.log(f"val_bytes:pieces total:{int(total)}")
        return tables
    per_token = torch.from_numpy(sidecar.astype(np.int32))
    tokens = val_tokens.long().cpu()
    from_pieces = token_bytes(tables, tokens[:-1], tokens[1:])
    operator = torch.isin(tokens[1:], torch.tensor(caseops_operator_ids(sp)))
    wrong = torch.zeros(len(tokens), dtype=torch.bool)
    wrong[0] = per_token[0] != 0  # the first token, a BOS, stands for no text
    wrong[1:] = torch.where(operator, (per_token[1:] != 0) & (per_token[1:] != 3), per_token[1:] != from_pieces)
    first_wrong = int(wrong.nonzero()[0, 0]) if wrong.any() else -1
    require(
        first_wrong < 0,
        f"DATA_PATH={cfg.data_path}: the byte sidecars disagree with TOKENIZER_PATH's pieces at {int(wrong.sum())} "
        f"tokens (the first is token {first_wrong}); rebuild them with data/build_shards.py --transform caseops",
        DataError,
    )
    rt.log(f"val_bytes:sidecars total:{int(per_token[1:].sum())} (CaseOps: the original text's bytes per token)")
    return tables._replace(per_token=per_token)


def plan_windows(num_targets: int, window: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, score_from) of windows of `window` targets scoring each of [0, num_targets) once: window k starts at
    k*stride and scores its last `stride` (the first all), a last one aligned to the end scores what is left."""
    assert num_targets >= window and 0 < stride <= window
    starts = list(range(0, num_targets - window + 1, stride))
    score_from = [0] + [window - stride] * (len(starts) - 1)
    covered = starts[-1] + window
    if covered < num_targets:
        starts.append(num_targets - window)
        score_from.append(window - (num_targets - covered))
    return torch.tensor(starts, dtype=torch.long), torch.tensor(score_from, dtype=torch.long)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal share [lo, hi) of n items for `rank`."""
    return n * rank // world_size, n * (rank + 1) // world_size


class NgramMixer:
    """Online mixture p = sum_k w_k p_k of the network and unigram, bigram and trigram experts counted from scored
    targets only, each order Witten-Bell-interpolated with the one below (uniform below the unigram): p(y|h) = (c(h,y) +
    t(h) p_lower(y)) / (c(h) + t(h)), t(h) the distinct tokens seen after h, so every token has mass. The trigram's
    context (never the target: a row sums to its context's count) is hashed into MIX_BUCKETS rows. Per chunk the weights
    take an exponentiated-gradient step on the mixture's log loss (Kivinen, Warmuth), w_k ~ w_k exp(MIX_ETA
    mean(p_k(y)/p(y))): it tracks the best mixture; Hedge on each expert's own loss would pick the network alone."""

    def __init__(self, cfg: Config, device):
        self.vocab, self.eta, self.buckets = cfg.vocab_size, cfg.mix_eta, cfg.mix_buckets
        self.width = self.vocab + 2  # per order, flat, a row per context: each next token y's count, then c(h), t(h)
        self.tables = [
            torch.zeros(rows * self.width, dtype=torch.int32, device=device) for rows in (1, self.vocab, self.buckets)
        ]
        self.log_w = torch.tensor([0.91, 0.03, 0.03, 0.03], dtype=torch.float64, device=device).log()
        self.grad = torch.zeros(5, dtype=torch.float64, device=device)  # sums of p_k(y) / p(y), then the count

    def contexts(self, tokens: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        """Each order's context row for targets `pos` (target i predicts tokens[i + 1]): tokens <= i only."""
        prev, prev2 = tokens[pos].long(), tokens[(pos - 1).clamp(min=0)].long()
        return [torch.zeros_like(prev), prev, (prev2 * 2_654_435_761 + prev) % self.buckets]

    def mix(self, tokens: torch.Tensor, pos: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        """The mixture's nll (float64) of targets `pos` given the network's; adds them to the chunk's gradient."""
        y, experts = tokens[pos + 1].long(), [(-nll.double()).exp()]
        lower = torch.full_like(experts[0], 1 / self.vocab)
        for table, row in zip(self.tables, self.contexts(tokens, pos)):  # unigram, bigram, trigram
            c, n, t = (table[row * self.width + col].double() for col in (y, self.vocab, self.vocab + 1))
            lower = torch.where(n > 0, (c + t * lower) / (n + t), lower)
            experts.append(lower)
        probs = torch.stack(experts, 1)
        mixed = probs @ self.log_w.softmax(0)
        self.grad += torch.cat([(probs / mixed[:, None]).sum(0), mixed.new_tensor([len(mixed)])])
        return -mixed.log()

    def update(self, tokens: torch.Tensor, a: int, b: int, world_size: int) -> None:
        """After the chunk of targets [a, b) is scored: a step from its gradient summed over ranks, then every rank
        counts its targets itself. So at a chunk's start every rank holds the counts of all targets before it."""
        if world_size > 1:
            dist.all_reduce(self.grad)
        self.log_w += self.eta * self.grad[:-1] / self.grad[-1]
        self.grad.zero_()
        pos = torch.arange(a, b, device=tokens.device)
        y = tokens[pos + 1].long()
        for table, row in zip(self.tables, self.contexts(tokens, pos)):
            seen = torch.unique(row * self.width + y)  # each (context, next token) once
            new_types = seen[table[seen] == 0] // self.width * self.width + self.vocab + 1
            for keys in (row * self.width + y, row * self.width + self.vocab, new_types):  # c(h,y), c(h), t(h)
                table.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))


@torch.no_grad()
def score_windows(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    starts: torch.Tensor,
    score_from: torch.Tensor,
    window: int,
    batch: int,
    tables: ByteTables,
    nll_out: torch.Tensor | None = None,
    mixer: NgramMixer | None = None,
) -> torch.Tensor:
    """Sums (loss nats, scored tokens, bytes) as float64 [3] over the given windows. `tokens` is the whole split;
    target i predicts tokens[i + 1] (nll_out[i], for tests, gets its loss). A partial batch is padded with copies of
    its last window that score nothing, so compiled blocks see one batch shape, the one check_eval_budget primed."""
    pad = -len(starts) % batch
    first = torch.cat([starts, starts[-1:].expand(pad)]).to(tokens.device)
    score = torch.cat([score_from, score_from.new_full((pad,), window)]).to(tokens.device)
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    for lo in range(0, len(first), batch):
        score_batch(
            logits_fn,
            tokens,
            first[lo : lo + batch],
            window,
            score[lo : lo + batch],
            score.new_full((batch,), window),
            tables,
            sums,
            nll_out,
            mixer,
        )
    return sums


def score_batch(
    logits_fn, tokens, first: torch.Tensor, window: int, lo, hi, tables, sums, nll_out, mixer: NgramMixer | None = None
) -> tuple:
    """Adds targets lo[b] <= j < hi[b] of the windows tokens[first[b]:][:window] (past the split's end: its last token,
    seen by no scored target) to `sums`, mixed by any `mixer`; returns the network's losses [B, window] (with any
    gradients) and their mask."""
    offsets = torch.arange(window + 1, device=tokens.device)
    seq = tokens[(first[:, None] + offsets).clamp(max=len(tokens) - 1)].long()
    x, y = seq[:, :-1], seq[:, 1:]
    nll = F.cross_entropy(logits_fn(x).float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    mask = (offsets[None, :-1] >= lo[:, None]) & (offsets[None, :-1] < hi[:, None])
    pos, scored = (first[:, None] + offsets[:-1])[mask], nll.detach()[mask]
    if mixer is not None:
        scored = mixer.mix(tokens, pos, scored)
    if tables.per_token is None:
        nbytes = token_bytes(tables, x, y)[mask]
    else:  # target i predicts token i + 1: that token's bytes of the original text
        nbytes = tables.per_token[pos + 1]
    sums += torch.stack([scored.double().sum(), mask.sum(), nbytes.sum()])
    if nll_out is not None:
        nll_out[pos] = scored.to(nll_out.dtype)
    return nll, mask


def evaluation_windows(cfg: Config) -> list[tuple[str, int, int, str]]:
    """The final evaluations as (kind, window, stride, adapter): the round trip over non-overlapping TRAIN_SEQ_LEN
    windows, then the sliding window when 0 < EVAL_STRIDE < TRAIN_SEQ_LEN, then score-first TTT when TTT_LR > 0 (the
    score is the last): `ttt` or `ttt_lora` (TTT_ADAPTER) with the last one's windows; MIX_ETA mixes the last."""
    window = cfg.train_seq_len
    kinds = [("roundtrip", window, window, "none")]
    if 0 < cfg.eval_stride < window:
        kinds.append(("sliding", window, cfg.eval_stride, "none"))
    if cfg.ttt_lr:
        name = "ttt" if cfg.ttt_adapter == "sgd" else "ttt_lora"
        _, last_window, last_stride, _ = kinds[-1]
        kinds.append((name, last_window, last_stride, cfg.ttt_adapter))
    if cfg.mix_eta:
        name, last_window, last_stride, adapter = kinds[-1]
        kinds[-1] = (name + "_mix", last_window, last_stride, adapter)
    return kinds


def evaluate(
    model: GPT,
    plan: Plan,
    tokens: torch.Tensor,
    cfg: Config,
    rank: int,
    world_size: int,
    tables: ByteTables,
    autocast,
    window: int,
    stride: int,
    adapter: str = "none",
    nll_out: torch.Tensor | None = None,
    mixer: NgramMixer | None = None,
) -> tuple[float, float]:
    """(val_loss, val_bpb) of the split, windows of `window` moved by `stride`, with legal score-first TTT of `adapter`
    (none; sgd: TTT_CHUNK targets at a time scored, then trained on; lora: score_documents); weights restored after.
    A `mixer` (adapter none or sgd) is chunked alike and counts each chunk's targets once they are scored."""
    trains = adapter != "none"
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if trains else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum) if trains else None
    logits_fn, was_training = partial(eval_logits, model, plan, autocast), model.training
    model.eval()
    tables = tables.to(tokens.device)
    if adapter == "lora":
        sums = score_documents(
            model, logits_fn, params, optimizer, tokens, cfg, rank, world_size, tables, window, nll_out
        )
    else:
        sums = score_chunks(
            logits_fn, params, optimizer, tokens, cfg, rank, world_size, tables, window, stride, nll_out, mixer
        )
    if saved:  # TTT's updates are undone
        model.load_state_dict(saved)
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    loss, count, nbytes = sums.tolist()
    return loss / count, loss / math.log(2) / nbytes


def score_chunks(logits_fn, params, optimizer, tokens, cfg, rank, world_size, tables, window, stride, nll_out, mixer):
    """Sums of the windows' scores, TTT_CHUNK targets at a time when SGD TTT (optimizer) or a mixer learns from what
    was scored: each chunk's windows are scored (shared out over ranks), then the mixer counts the chunk's targets
    and SGD trains on them, its LR falling from TTT_LR as half a cosine over the chunks."""
    starts, score_from = plan_windows(len(tokens) - 1, window, stride)
    first = starts + score_from  # first scored target of each window, rising
    learns = optimizer is not None or mixer is not None
    chunk_of = first // cfg.ttt_chunk if learns else torch.zeros_like(first)
    batch = max(1, min(cfg.val_batch_size // (world_size * window), math.ceil(len(starts) / world_size)))
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    chunks = torch.unique_consecutive(chunk_of).tolist()
    for i, chunk in enumerate(chunks):
        windows = (chunk_of == chunk).nonzero().flatten()
        mine = windows[slice(*shard_range(len(windows), rank, world_size))]
        sums += score_windows(logits_fn, tokens, starts[mine], score_from[mine], window, batch, tables, nll_out, mixer)
        a, b = int(first[windows[0]]), int(starts[windows[-1]]) + window  # the targets this chunk just scored
        if mixer is not None:
            mixer.update(tokens, a, b, world_size)
        if optimizer is not None and chunk != chunks[-1]:
            optimizer.param_groups[0]["lr"] = cfg.ttt_lr * (1 + math.cos(math.pi * i / (len(chunks) - 1))) / 2
            ttt_step(logits_fn, params, optimizer, tokens, a, b, cfg, rank, world_size)
    return sums


def eval_logits(model: GPT, plan: Plan, autocast, x, blocks: Blocks = Blocks.COMPILED, adapter=None) -> torch.Tensor:
    with autocast():
        return model.logits(x, plan, blocks, adapter)


def document_bounds(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """Each document's targets [start, end), BOS to the one before the next BOS: together every target once."""
    starts = sorted({0, *(tokens[:-1] == BOS_ID).nonzero().flatten().tolist()})
    return list(zip(starts, starts[1:] + [len(tokens) - 1]))


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def lora_rows(cfg: Config, world_size: int, window: int) -> int:
    """Documents per LoRA TTT batch on each rank: VAL_BATCH_SIZE tokens of windows over all ranks."""
    return max(1, cfg.val_batch_size // (world_size * window))


def lora_batches(bounds: list, cfg: Config, window: int, rank: int, world_size: int) -> list[tuple[int, list]]:
    """Per part of the documents, cut at the TTT_PHASES counts: (its end, this rank's documents of it in batches,
    longest first and dealt round the ranks, each with its chunk steps' window lengths: the document so far, rounded
    up to a power of 2 (few shapes to compile), at most `window`)."""
    rows, parts = lora_rows(cfg, world_size, window), []
    cuts = [0, *[n for n in cfg.ttt_phase_docs if n < len(bounds)], len(bounds)]
    for lo, hi in zip(cuts, cuts[1:]):
        longest_first = sorted(bounds[lo:hi], key=lambda d: d[0] - d[1])
        mine = longest_first[rank::world_size]  # similar lengths, similar work per rank
        batches = []
        for i in range(0, len(mine), rows):
            docs = mine[i : i + rows]
            steps = math.ceil(max(end - start for start, end in docs) / cfg.ttt_lora_chunk)
            lengths = [min(window, next_power_of_two((c + 1) * cfg.ttt_lora_chunk)) for c in range(steps)]
            batches.append((docs, lengths))
        parts.append((hi, batches))
    return parts


def lora_adapter(model: GPT, rows: int, rank: int, device) -> LoraAdapter:
    """Fresh adapters, one per batch row, for every block's linear maps and the head: A uniform in +-1/sqrt(fan_in)
    from a fixed seed, B zero, so an adapter starts as exactly the base model."""
    generator = torch.Generator().manual_seed(0)

    def pair(fan_out: int, fan_in: int):
        a = (2 * torch.rand(rank, fan_in, generator=generator) - 1) / math.sqrt(fan_in)
        return a.expand(rows, -1, -1).contiguous().to(device), torch.zeros(rows, fan_out, rank, device=device)

    blocks = []
    for block in model.blocks:
        linears = [(name, m) for name, m in block.named_modules() if isinstance(m, CastedLinear)]
        blocks.append({name: pair(*m.weight.shape) for name, m in linears})
    return LoraAdapter(tuple(blocks), pair(*model.tok_emb.weight.shape))


def score_documents(model, logits_fn, params, optimizer, tokens, cfg, rank, world_size, tables, window, nll_out):
    """Sums of phased LoRA TTT (the 2026-04-14..27 records): lora_batch per batch. At each TTT_PHASES count n, once
    all ranks scored documents < n, all weights take ttt_step (TTT_LR, no cosine) per TTT_CHUNK of their text."""
    bounds, sums = document_bounds(tokens), torch.zeros(3, dtype=torch.float64, device=tokens.device)
    fresh = lora_adapter(model, lora_rows(cfg, world_size, window), cfg.ttt_lora_rank, tokens.device)
    phase_logits = partial(logits_fn, blocks=Blocks.DYNAMIC)  # all weights train, through LoRA's twins
    for hi, batches in lora_batches(bounds, cfg, window, rank, world_size):
        for docs, lengths in batches:
            lora_batch(model, logits_fn, fresh, tokens, docs, lengths, cfg, tables, sums, nll_out)
        if hi < len(bounds):  # a global phase over documents [0, hi)
            optimizer.state.clear()  # fresh momentum per phase
            end = bounds[hi][0]
            for a in range(0, end - cfg.train_seq_len + 1, cfg.ttt_chunk):
                b = min(a + cfg.ttt_chunk, end)
                ttt_step(phase_logits, params, optimizer, tokens, a, b, cfg, rank, world_size)
    return sums


def live_rows(docs: list, done: int) -> int:
    """How many of `docs` (longest first) have targets past `done`, rounded up to a power of 2: few shapes (on the
    eager blocks a new shape every step cost ~0.3 s a step on an H200; COMPILE=0 runs them)."""
    live = sum(end - start > done for start, end in docs)
    return min(len(docs), next_power_of_two(live))


def lora_batch(
    model: GPT, logits_fn, fresh: LoraAdapter, tokens, docs: list, lengths: list, cfg: Config, tables, sums, nll_out
) -> None:
    """Row b scores docs[b] by TTT_LORA_CHUNK targets, each seeing lengths[c] tokens of its document at most (the
    window placed from the chunk's start alone), then its own adapter takes an Adam step on that chunk's mean loss
    (independent rows, longest first: only live ones run)."""
    model.requires_grad_(False)  # the chunk steps differentiate the adapters only (the phases train the weights)
    adapter = torch.utils._pytree.tree_map(lambda t: t[: len(docs)].clone().requires_grad_(), fresh)  # reset
    params = torch.utils._pytree.tree_leaves(adapter)
    optimizer = torch.optim.Adam(params, lr=cfg.ttt_lora_lr, betas=(0.0, 0.99), eps=1e-10)  # the records' beta1 = 0
    start, end = torch.tensor(docs, device=tokens.device).T
    for c, length in enumerate(lengths):
        live = live_rows(docs, c * cfg.ttt_lora_chunk)
        a = torch.minimum(start[:live] + c * cfg.ttt_lora_chunk, end[:live])  # the chunk's targets [a, b)
        b = torch.minimum(a + cfg.ttt_lora_chunk, end[:live])
        # The window ends where a whole chunk would end, wherever the document ends: a later BOS that cuts the last
        # chunk short moves no window, so no earlier target's context depends on a later token.
        first = torch.maximum(start[:live], a + cfg.ttt_lora_chunk - length)
        with torch.enable_grad():
            rows = torch.utils._pytree.tree_map(lambda t: t[:live], adapter)
            rows_logits = partial(logits_fn, blocks=Blocks.DYNAMIC, adapter=rows)
            nll, mask = score_batch(rows_logits, tokens, first, length, a - first, b - first, tables, sums, nll_out)
            if c + 1 < len(lengths):  # score first, then train on what was scored
                loss = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
                optimizer.step()
    model.requires_grad_(True)


def ttt_step(
    logits_fn, params, optimizer, tokens: torch.Tensor, a: int, b: int, cfg: Config, rank: int, world_size: int
) -> None:
    """TTT_EPOCHS SGD steps on targets [a, b): the whole TRAIN_SEQ_LEN pieces from a (inputs
    tokens[s:s+L], labels one later), shared out over ranks; the loss is the mean over all of them."""
    L = cfg.train_seq_len
    pieces = torch.arange(a, max(a, b - L + 1), L, device=tokens.device)
    mine = pieces[slice(*shard_range(len(pieces), rank, world_size))]
    seq = tokens[mine[:, None] + torch.arange(L + 1, device=tokens.device)].long()
    for _ in range(cfg.ttt_epochs):
        for p in params:
            p.grad = torch.zeros_like(p)
        if len(mine):
            with torch.enable_grad():
                logits = logits_fn(seq[:, :-1]).float()
                loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="sum")
                (loss / (len(pieces) * L)).backward()
        if world_size > 1:
            for p in params:
                dist.all_reduce(p.grad)
        if cfg.ttt_grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
        optimizer.step()


# The evaluation's cost, estimated before any training: each final evaluation's forwards and TTT steps are timed on
# synthetic tokens as evaluate runs them (which also primes their compiled graphs, never on validation text), then
# scaled to this rank's share of the split and to the competition's (8 GPUs, the FineWeb validation split).
COMPETITION_VAL_TOKENS, COMPETITION_GPUS = 40_540_160, 8


@torch.no_grad()
def check_eval_budget(base: GPT, cfg: Config, rt: Runtime, bounds: list) -> None:
    """Estimate the final evaluations' seconds on `bounds` (document_bounds of the split); refuse a run whose
    evaluations would exceed EVAL_BUDGET_S here or at the competition's scale."""
    logits_fn = partial(eval_logits, base, plan_for(cfg, cfg.eval_passes), rt.autocast)
    num_targets, estimate = bounds[-1][1], {}
    kinds = ", ".join(kind for kind, *_ in evaluation_windows(cfg))
    rt.log(f"eval_budget: timing {kinds} on synthetic tokens (compiles their graphs: minutes on a cold cache)")
    for kind, window, stride, adapter in evaluation_windows(cfg):
        windows = math.ceil(len(plan_windows(num_targets, window, stride)[0]) / rt.world_size)  # this rank's
        rows = lora_rows(cfg, rt.world_size, window)
        batch = rows if adapter == "lora" else min(rows, windows)  # as evaluate batches them: one shape
        seconds = 0.0
        sgd_steps = ttt_sgd_steps(cfg, adapter, bounds)
        if sgd_steps:
            seconds += sgd_step_seconds(base, logits_fn, cfg, rt, adapter) * sgd_steps
        if adapter == "lora":
            seconds += lora_seconds(base, logits_fn, cfg, rt, bounds, window, batch)
        else:
            seconds += window_seconds(logits_fn, cfg, rt, kind, batch, window) * math.ceil(windows / batch)
        estimate[kind] = rt.agree_max(seconds)
    total = sum(estimate.values())
    scaled = competition_seconds(total, num_targets, rt.world_size, rt.device.type)
    parts = " ".join(f"{kind}:{seconds:.1f}s" for kind, seconds in estimate.items())
    rt.log(f"eval_budget_estimate {parts} total:{total:.1f}s budget:{cfg.eval_budget_s:g}s")
    if rt.device.type == "cuda":  # a CPU's seconds say nothing of the competition's GPUs
        rt.log(f"eval_budget_competition total:{scaled:.1f}s (8 GPUs, 40,540,160 tokens, 50,000 documents)")
    worst = max(total, scaled)
    if worst > cfg.eval_budget_s:
        ttt = sum(seconds for kind, seconds in estimate.items() if kind.startswith("ttt")) * worst / total
        if ttt > worst / 2:
            hint = f"TTT is {ttt:.0f} s of it: lower TTT_EPOCHS, raise EVAL_STRIDE or turn TTT off with TTT_LR=0"
        else:
            hint = "raise EVAL_STRIDE"
        where = " at the competition scale" if scaled > total else ""
        raise Refused(
            f"EVAL_BUDGET_S={cfg.eval_budget_s:g}: the final evaluations would take about {worst:.0f} s{where}; {hint}"
        )


def ttt_sgd_steps(cfg: Config, adapter: str, bounds: list) -> int:
    """SGD steps of all weights an evaluation takes: sgd, one per TTT_CHUNK but the last; lora, its global phases',
    one per TTT_CHUNK of the documents before each TTT_PHASES count."""
    if adapter == "sgd":
        return math.ceil(bounds[-1][1] / cfg.ttt_chunk) - 1
    if adapter == "lora":
        phase_ends = [bounds[min(n, len(bounds) - 1)][0] for n in cfg.ttt_phase_docs]
        return sum(math.ceil(end / cfg.ttt_chunk) for end in phase_ends)
    return 0


def sgd_step_seconds(base: GPT, logits_fn, cfg: Config, rt: Runtime, adapter: str) -> float:
    """Seconds of one SGD step on TTT_CHUNK tokens, timed after priming every shape evaluate will run: sgd runs the
    compiled twins at one size; LoRA's phases run its dynamic twins at any size (seen to change, they turn dynamic)."""
    if adapter == "sgd":
        spans, twin = (cfg.ttt_chunk, cfg.ttt_chunk), logits_fn
    else:
        spans = (cfg.ttt_chunk, cfg.ttt_chunk // 2, rt.world_size * cfg.train_seq_len, cfg.ttt_chunk)
        twin = partial(logits_fn, blocks=Blocks.DYNAMIC)
    seconds = [ttt_step_seconds(base, twin, cfg, rt, span) for span in spans]
    return seconds[-1]


def lora_seconds(base: GPT, logits_fn, cfg: Config, rt: Runtime, bounds: list, window: int, batch: int) -> float:
    """LoRA TTT's chunk steps on this rank's documents: a fixed cost per step plus a cost per row-token, from a step
    of 1 row and one of `batch` rows, each timed on its second call (the first compiles; 2 rows, then 3 at half the
    window, turn the shapes dynamic)."""
    for rows, length in ((2, window), (3, window // 2), (1, window)):
        lora_step_seconds(base, logits_fn, cfg, rt, rows, length)
    one = lora_step_seconds(base, logits_fn, cfg, rt, 1, window)
    lora_step_seconds(base, logits_fn, cfg, rt, batch, window)
    full = lora_step_seconds(base, logits_fn, cfg, rt, batch, window)
    per_row = (full - one) / max(1, batch - 1)
    seconds = 0.0
    for _, batches in lora_batches(bounds, cfg, window, rt.rank, rt.world_size):
        for docs, lengths in batches:
            row_tokens = sum(length * live_rows(docs, c * cfg.ttt_lora_chunk) for c, length in enumerate(lengths))
            seconds += (one - per_row) * len(lengths) + per_row * row_tokens / window
    return seconds


def window_seconds(logits_fn, cfg: Config, rt: Runtime, kind: str, batch: int, window: int) -> float:
    """Seconds of one batch of scoring windows (timed on its second call; the first compiles), with the mixer's work
    when the evaluation mixes: every input token mixed, and an update per batch (at least one per chunk)."""
    x = torch.randint(0, cfg.vocab_size, (batch, window), device=rt.device)
    mixer = NgramMixer(cfg, rt.device) if kind.endswith("_mix") else None

    def forward():
        logits_fn(x)
        if mixer is not None:
            pos = torch.arange(x.numel() - 1, device=rt.device)
            mixer.mix(x.flatten(), pos, torch.zeros(len(pos), device=rt.device))
            mixer.update(x.flatten(), 0, len(pos), 1)

    timed(rt, forward)
    return timed(rt, forward)


def timed(rt: Runtime, fn: Callable, *args) -> float:
    """Seconds fn(*args) takes on this rank's device."""
    start = rt.clock()
    fn(*args)
    return rt.clock() - start


def lora_step_seconds(base: GPT, logits_fn, cfg: Config, rt: Runtime, rows: int, window: int) -> float:
    """Seconds a LoRA TTT chunk step (score, then an Adam step) takes with `rows` synthetic documents seeing `window`
    tokens, run as evaluate runs it (9 steps, the last only scoring, less 1 step only scoring)."""
    length = 10 * max(window, cfg.ttt_lora_chunk)
    tokens = torch.randint(2, cfg.vocab_size, (rows * length,), device=rt.device)
    docs = [(i * length, (i + 1) * length - 1) for i in range(rows)]
    tables = ByteTables(*(torch.zeros(cfg.vocab_size, dtype=t, device=rt.device) for t in (torch.int16, bool, bool)))
    fresh, sums = lora_adapter(base, rows, cfg.ttt_lora_rank, rt.device), torch.zeros(3, device=rt.device)
    nine = timed(rt, lora_batch, base, logits_fn, fresh, tokens, docs, [window] * 9, cfg, tables, sums, None)
    one = timed(rt, lora_batch, base, logits_fn, fresh, tokens, docs, [window], cfg, tables, sums, None)
    return (nine - one) / 8


def ttt_step_seconds(base: GPT, logits_fn, cfg: Config, rt: Runtime, span: int) -> float:
    """Seconds of a TTT SGD step (ttt_step) on `span` synthetic tokens at LR 0 (the weights stay)."""
    tokens = torch.randint(2, cfg.vocab_size, (span + 1,), device=rt.device)
    params = list(base.parameters())
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=cfg.ttt_momentum)
    return timed(rt, ttt_step, logits_fn, params, optimizer, tokens, 0, span, cfg, rt.rank, rt.world_size)


def competition_seconds(seconds: float, num_targets: int, world_size: int, device_type: str) -> float:
    """The estimate at the competition's scale (the FineWeb validation split on 8 GPUs); 0 off CUDA (CPU runs pass)."""
    if device_type != "cuda":
        return 0.0
    return seconds * COMPETITION_VAL_TOKENS / num_targets * world_size / COMPETITION_GPUS


# ----------------------------------------------------------------------------------------------
# Quantization and export
#
# One recipe (per group: bits, clip rule, GPTQ; the codec; the byte layout), built once from the config, drives
# quantize -> serialize -> shuffle -> compress, each a pure function with its inverse. A row's step is k * std(row) /
# qmax, codes clipped at k sigma (the 2026-04-09 record's rule: k sets the rate; only outliers clip), or max|row| /
# qmax for k = 0; it is stored in float16 and the codes are rounded with exactly the stored value. GPTQ (Frantar et
# al.) rounds columns in descending order of the input Hessian's diagonal (act-order) and spreads each one's error
# over the columns still to come. The file: magic, version, a JSON header, the compressed streams.
# ----------------------------------------------------------------------------------------------

KEEP_FLOAT_MAX_NUMEL = 65_536
SCALE_RANGE = (2.0**-24, 65504.0)  # float16's smallest and largest: no step is zero or infinite
ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGQZ", 1
EXPORT_STREAMS = 16  # 36M codes in 16 brotli streams: ~200 bytes more than one stream, compressed in parallel
FIT_STEP, FIT_MAX_COARSENING, FIT_MAX_TRIES, FIT_MARGIN = 1.01, 4.0, 8, 2e-4
GROUPS = ("attn", "mlp", "embed")


class ArtifactTooLarge(UserError):
    """No export fits under TARGET_BYTES: one line, exit code 3, and no artifact is written."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class QuantGroup:
    bits: int  # codes in [-qmax, qmax], qmax = 2^(bits-1) - 1, one byte each
    clip_sigmas: float  # step = clip_sigmas * std(row) / qmax; 0 = max|row| / qmax
    gptq: bool  # GPTQ where a Hessian was collected, else rounding to nearest


@dataclasses.dataclass(frozen=True)
class ExportRecipe:
    attn: QuantGroup
    mlp: QuantGroup
    embed: QuantGroup  # the embedding table (the tied head), and any other large matrix outside the blocks
    compressor: str  # brotli or zstd
    streams: int = EXPORT_STREAMS  # independently compressed pieces of the payload, one thread each

    def with_sigmas(self, sigmas: dict[str, float]) -> "ExportRecipe":
        return dataclasses.replace(
            self, **{g: dataclasses.replace(getattr(self, g), clip_sigmas=k) for g, k in sigmas.items()}
        )

    def describe(self) -> str:
        return (
            " ".join(
                f"{g}:int{q.bits}/k{q.clip_sigmas:.4g}{'/gptq' * q.gptq}"
                for g, q in ((g, getattr(self, g)) for g in GROUPS)
            )
            + f" codec:{self.compressor}x{self.streams}"
        )


def export_recipe(cfg: Config) -> ExportRecipe:
    return ExportRecipe(
        attn=QuantGroup(cfg.quant_bits_attn, cfg.matrix_clip_sigmas, cfg.gptq),
        mlp=QuantGroup(cfg.quant_bits_mlp, cfg.matrix_clip_sigmas, cfg.gptq),
        embed=QuantGroup(cfg.quant_bits_embed, cfg.embed_clip_sigmas, cfg.gptq),
        compressor=cfg.compressor,
    )


def weight_group(name: str) -> str:
    """Which knobs govern a tensor: attention, MLP or embedding (everything outside the blocks)."""
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "embed"


def row_scales(w: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """Each row's step as stored (float16): clip_sigmas * std(row) / qmax, or for clip_sigmas = 0
    max|row| / qmax rounded up (a 2^-10 margin covers float16's rounding), so that nothing clips."""
    qmax, w = 2 ** (bits - 1) - 1, w.float()
    step = clip_sigmas * w.std(dim=-1) if clip_sigmas > 0 else w.abs().amax(dim=-1) * (1 + 2**-10)
    return (step / qmax).clamp(*SCALE_RANGE).to(torch.float16)


def quantize_rows(w: torch.Tensor, bits: int = 8, clip_sigmas: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric rounding with the stored step, so dequantization reproduces what was
    rounded: |error| <= step / 2 wherever |w| <= qmax * step. Works on stacks [..., rows, cols]."""
    qmax, scale = 2 ** (bits - 1) - 1, row_scales(w, bits, clip_sigmas)
    return torch.round(w.float() / scale.float()[..., None]).clamp_(-qmax, qmax).to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, clip_sigmas: float = 0.0, block: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with act-order on a matrix [rows, cols] or on a stack [n, rows, cols] with one input
    Hessian each: one column loop serves the stack. Steps from the unmodified rows, as quantize_rows."""
    single = w.ndim == 2
    W, H = (w[None], hessian[None]) if single else (w, hessian)
    qmax, scale = 2 ** (bits - 1) - 1, row_scales(W, bits, clip_sigmas)
    s, H = scale.float()[..., None], H.float().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0  # inputs that never fire: unit Hessian, weight zero
    diag.add_(dead.float())
    diag.add_(damp * diag.mean(-1, keepdim=True))
    order = torch.argsort(diag, dim=-1, descending=True)  # act-order: the most used inputs first
    cols = order[:, None, :].expand_as(W)
    W = W.float().masked_fill(dead[:, None, :], 0.0).gather(2, cols)
    H = H.gather(1, order[:, :, None].expand_as(H)).gather(2, order[:, None, :].expand_as(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for lo in range(0, W.size(-1), block):
        hi = min(lo + block, W.size(-1))
        Wb, Ub, errors = W[..., lo:hi].clone(), U[:, lo:hi, lo:hi], torch.zeros_like(W[..., lo:hi])
        for i in range(hi - lo):
            q = Q[..., lo + i : lo + i + 1] = torch.round(Wb[..., i : i + 1] / s).clamp_(-qmax, qmax)
            errors[..., i : i + 1] = err = (Wb[..., i : i + 1] - q * s) / Ub[:, i : i + 1, i : i + 1]
            Wb[..., i + 1 :] -= err * Ub[:, i : i + 1, i + 1 :]
        W[..., hi:] -= errors @ U[:, lo:hi, hi:]
    codes = torch.empty_like(Q).scatter_(2, cols, Q).to(torch.int8)  # back to the original column order
    return (codes[0], scale[0]) if single else (codes, scale)


@torch.no_grad()
def collect_hessians(model: "GPT", plan: Plan, batches, autocast) -> dict[str, torch.Tensor]:
    """E[x x^T] over the calibration tokens, on the model's device, of every block matrix's input (q,
    k and v share c_q's; a shared block sums its passes) and of the head's, the final hidden states."""
    sums, hooks, tokens = {}, [], 0

    def add(key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.size(-1)).float()
        with torch.autocast(x.device.type, enabled=False):  # a bf16 product is not PSD
            sums.setdefault(key, torch.zeros(x.size(1), x.size(1), device=x.device)).addmm_(x.T, x)

    for name, module in model.blocks.named_modules():
        if isinstance(module, CastedLinear) and not name.endswith((".c_k", ".c_v")):
            hooks.append(module.register_forward_hook(lambda m, i, o, key=f"blocks.{name}.weight": add(key, i[0])))
    try:
        for x in batches:
            with autocast():  # eager blocks, so the hooks see every call; the head reads the final hidden states
                add("tok_emb.weight", model.hidden(x, plan, Blocks.EAGER))
            tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return {k: v / max(tokens, 1) for k, v in sums.items()}


def hessian_key(name: str) -> str:
    """q, k and v read the same input, so they share one Hessian: c_q's."""
    return name.replace(".attn.c_k.", ".attn.c_q.").replace(".attn.c_v.", ".attn.c_q.")


class Stored(NamedTuple):
    """A tensor in the artifact: int8 codes and float16 steps (`scale`), or its values kept whole
    (float16; float32 where float16 would overflow); `dtype` is its own, restored on loading."""

    dtype: str
    values: torch.Tensor
    scale: torch.Tensor | None = None
    bits: int = 0


def dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def quantized_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in state.items() if t.is_floating_point() and t.ndim == 2 and t.numel() > KEEP_FLOAT_MAX_NUMEL]


def quantize_state(
    state: dict[str, torch.Tensor], recipe: ExportRecipe, hessians: dict[str, torch.Tensor] | None = None
) -> dict[str, Stored]:
    """Large float matrices -> codes and steps by their group's recipe, stacked by shape so GPTQ runs
    one column loop per shape, on the weights' device; every other tensor is kept whole."""
    hessians, stacks, stored = hessians or {}, {}, {}
    for name in quantized_names(state):
        group = getattr(recipe, weight_group(name))
        stacks.setdefault((state[name].shape, group, group.gptq and hessian_key(name) in hessians), []).append(name)
    for (_, group, use_gptq), names in stacks.items():
        w = torch.stack([state[n].detach().float() for n in names])
        if use_gptq:
            h = torch.stack([hessians[hessian_key(n)] for n in names]).to(w.device)
            codes, scale = gptq_quantize(w, h, group.bits, group.clip_sigmas)
        else:
            codes, scale = quantize_rows(w, group.bits, group.clip_sigmas)
        for n, c, s in zip(names, codes.cpu(), scale.cpu()):
            stored[n] = Stored(dtype_name(state[n]), c, s, group.bits)
    for name, t in ((n, t.detach().cpu()) for n, t in state.items() if n not in stored):
        half = t.half() if t.is_floating_point() else t
        stored[name] = Stored(dtype_name(t), half if torch.isfinite(half).equal(torch.isfinite(t)) else t.float())
    return {name: stored[name] for name in state}


def dequantize_state(stored: dict[str, Stored]) -> dict[str, torch.Tensor]:
    return {
        name: (s.values if s.scale is None else dequantize_rows(s.values, s.scale)).to(getattr(torch, s.dtype))
        for name, s in stored.items()
    }


def serialize(stored: dict[str, Stored]) -> tuple[list, dict[str, np.ndarray]]:
    """Tensors -> (header entries, sections): a section joins flat arrays of one kind ('codes' int8, 'scales' float16,
    one per dtype of whole tensors); an entry: [name, shape, dtype, bits, [[section, offset, count]...]] in elements."""
    # The codes first: behind 60 KB of shuffled float16, zstd-22 packed 36M codes 1 MB worse (measured).
    sections: dict[str, list[np.ndarray]] = {"codes": [], "scales": []}

    def put(section: str, t: torch.Tensor) -> list:
        arrays = sections.setdefault(section, [])
        arrays.append(t.reshape(-1).numpy())
        return [section, sum(a.size for a in arrays[:-1]), t.numel()]

    entries = [
        [
            name,
            list(s.values.shape),
            s.dtype,
            s.bits,
            [put("codes", s.values), put("scales", s.scale)] if s.bits else [put(dtype_name(s.values), s.values)],
        ]
        for name, s in stored.items()
    ]
    return entries, {k: np.concatenate(v) for k, v in sections.items() if v}


def deserialize(entries: list, sections: dict[str, np.ndarray]) -> dict[str, Stored]:
    stored = {}
    for name, shape, dtype, bits, refs in entries:
        parts = [torch.from_numpy(sections[section][offset : offset + count].copy()) for section, offset, count in refs]
        stored[name] = Stored(dtype, parts[0].reshape(shape), parts[1] if bits else None, bits)
    return stored


def shuffle_bytes(a: np.ndarray) -> bytes:
    """Byte planes: every element's first byte (little-endian), then every second byte, ...: the slowly
    varying high bytes of float16/float32 values sit together, where the compressor finds repeats."""
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes()


def unshuffle_bytes(data: bytes, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(data, np.uint8).reshape(dt.itemsize, -1).T.copy().view(dt).reshape(-1)


def codec(recipe: ExportRecipe) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """(compress, decompress) of one stream; zstd's one-shot functions build a fresh object per call (thread-safe)."""
    if recipe.compressor == "brotli":
        return partial(brotli.compress, quality=11), brotli.decompress
    return partial(zstandard.compress, level=ZSTD_LEVEL), zstandard.decompress


def codec_installed(compressor: str) -> bool:
    return {"brotli": brotli, "zstd": zstandard}[compressor] is not None


def compress(raw: bytes, recipe: ExportRecipe) -> list[bytes]:
    """`raw` in recipe.streams near-equal pieces, compressed in parallel threads (the codecs release the GIL)."""
    size = max(1, -(-len(raw) // recipe.streams))
    with ThreadPoolExecutor(recipe.streams) as pool:
        pieces = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
        return list(pool.map(codec(recipe)[0], pieces))


def decompress(streams: list[bytes], recipe: ExportRecipe) -> bytes:
    with ThreadPoolExecutor(len(streams)) as pool:
        return b"".join(pool.map(codec(recipe)[1], streams))


def pack_artifact(
    stored: dict[str, Stored], recipe: ExportRecipe, times: dict | None = None, meta: dict | None = None
) -> bytes:
    """Magic, version, the header's length (4 bytes, little-endian), the JSON header (zlib: 8 KB -> 1.5 KB for the
    36M model; `meta`: model settings, tokenizer hash), the compressed streams; `times` gets the steps' seconds."""
    start = time.perf_counter()
    entries, sections = serialize(stored)
    raw = b"".join(shuffle_bytes(a) for a in sections.values())
    middle = time.perf_counter()
    streams = compress(raw, recipe)
    (times if times is not None else {}).update(serialize=middle - start, compress=time.perf_counter() - middle)
    payload = b"".join(streams)
    header = zlib.compress(
        json.dumps(
            dict(
                recipe=dataclasses.asdict(recipe),
                meta=meta or {},
                tensors=entries,
                streams=[len(s) for s in streams],
                sections=[[k, a.dtype.name, a.size] for k, a in sections.items()],
                sha256=hashlib.sha256(payload).hexdigest(),
            ),
            separators=(",", ":"),
        ).encode(),
        9,
    )
    return ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION]) + len(header).to_bytes(4, "little") + header + payload


def artifact_header(blob: bytes, source) -> tuple[dict, ExportRecipe, int]:
    """The artifact's JSON header, its recipe and where its payload starts; one DataError line naming `source`."""
    if blob[:4] != ARTIFACT_MAGIC:
        raise DataError(f"{source}: not an artifact of this script (no {ARTIFACT_MAGIC.decode()} magic)")
    if blob[4:5] != bytes([ARTIFACT_VERSION]):
        raise DataError(f"{source}: artifact format version {blob[4:5].hex()}; this script reads {ARTIFACT_VERSION}")
    end = 9 + int.from_bytes(blob[5:9], "little")
    try:  # the recipe: the inverse of dataclasses.asdict
        header = json.loads(zlib.decompress(blob[9:end]))
        # older artifacts name "shuffle" (always on) and "zstd_level" (always 22)
        d = {k: v for k, v in header["recipe"].items() if k not in ("shuffle", "zstd_level")}
        recipe = ExportRecipe(**{**d, **{g: QuantGroup(**d[g]) for g in GROUPS}})
        if recipe.compressor not in CODECS or not all(5 <= getattr(recipe, g).bits <= 8 for g in GROUPS):
            raise ValueError(f"unknown recipe {recipe.describe()}")
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise DataError(f"{source}: header or export recipe not readable by this script ({exc})") from None
    return header, recipe, end


def unpack_artifact(blob: bytes, source) -> tuple[dict[str, Stored], ExportRecipe]:
    """Inverse of pack_artifact; one DataError line naming `source` for a wrong magic, version, recipe or checksum."""
    header, recipe, end = artifact_header(blob, source)
    payload = blob[end:]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise DataError(f"{source}: payload checksum mismatch (corrupt or truncated file)")
    require(
        codec_installed(recipe.compressor),
        f"{source}: written with {recipe.compressor}, whose package is missing (pip install -r requirements.txt)",
        DataError,
    )
    ends = np.cumsum([0] + header["streams"]).tolist()
    raw = decompress([payload[a:b] for a, b in zip(ends, ends[1:])], recipe)
    ends = np.cumsum([0] + [count * np.dtype(dtype).itemsize for _, dtype, count in header["sections"]]).tolist()
    sections = {
        name: unshuffle_bytes(raw[a:b], dtype) for (name, dtype, _), a, b in zip(header["sections"], ends, ends[1:])
    }
    return deserialize(header["tensors"], sections), recipe


def rounding_cost(state: dict[str, torch.Tensor], names: list[str], group: QuantGroup, weights: dict):
    """(bytes, error) of `names` rounded by `group`: the codes' empirical entropy plus 2 bytes a step
    (a fast stand-in for compressing them), and the squared rounding error weighted per input."""
    nbytes = error = 0.0
    for name in names:
        w = state[name].detach().float()
        codes, scale = quantize_rows(w, group.bits, group.clip_sigmas)
        p = torch.bincount(codes.flatten().long() + 128, minlength=256).double() / codes.numel()
        p = p[p > 0]
        entropy_bits = float(-(p * p.log2()).sum())
        nbytes += entropy_bits * codes.numel() / 8 + 2 * scale.numel()
        error += float(((dequantize_rows(codes, scale) - w) ** 2 * weights.get(name, 1.0)).sum())
    return nbytes, error


def coarsen(state, hessians, recipe: ExportRecipe, initial: ExportRecipe, saving: float):
    """Raise clip sigmas by FIT_STEP at a time, in the group that loses least (rounding error squared, weighted by the
    input Hessian's diagonal, else 1) per estimated byte saved, until `saving` bytes are: (recipe, estimated saving),
    or None when the std-clipped groups reach FIT_MAX_COARSENING times their starting sigmas first."""
    quantized = quantized_names(state)
    names = {g: [n for n in quantized if weight_group(n) == g] for g in GROUPS}
    weights = {
        n: hessians[hessian_key(n)].diagonal().to(state[n].device)
        for n in quantized
        if hessian_key(n) in (hessians or {})
    }
    # the groups with a std-based clip (k > 0) that hold quantized matrices: only their steps can grow
    sigmas = {g: getattr(recipe, g).clip_sigmas for g in GROUPS if names[g] and getattr(recipe, g).clip_sigmas > 0}
    now = {g: rounding_cost(state, names[g], getattr(recipe, g), weights) for g in sigmas}  # (bytes, error) per group
    trial, saved = {}, 0.0  # trial: each group's cost one FIT_STEP coarser, kept until that step is taken
    while saved < saving:
        for g in sigmas:
            may_grow = sigmas[g] * FIT_STEP <= FIT_MAX_COARSENING * getattr(initial, g).clip_sigmas
            if g not in trial and may_grow:
                coarser = getattr(recipe.with_sigmas({g: sigmas[g] * FIT_STEP}), g)
                trial[g] = rounding_cost(state, names[g], coarser, weights)
        error_per_byte = {}
        for g, (trial_bytes, trial_error) in trial.items():
            now_bytes, now_error = now[g]
            if trial_bytes < now_bytes:
                error_per_byte[g] = (trial_error - now_error) / (now_bytes - trial_bytes)
        if not error_per_byte:
            return None
        g = min(error_per_byte, key=error_per_byte.get)
        saved += now[g][0] - trial[g][0]
        now[g], sigmas[g] = trial.pop(g), sigmas[g] * FIT_STEP
    return recipe.with_sigmas(sigmas), saved


def check_reachable(state, recipe: ExportRecipe, budget: int) -> None:
    """ArtifactTooLarge in seconds, before any try, when none can fit (one try of a 139.5M-parameter model took 158 s):
    even the coarsest recipe fit_artifact may reach, every std-clipped group at FIT_MAX_COARSENING times its clip
    sigmas, is over `budget` by the fitter's own estimate (rounding_cost) less 10%, leaving out the float tensors and
    the header. A floor, not a forecast: brotli packed Gaussian and heavy-tailed codes 1-13% above the estimate; only
    contrived codes (half the rows near zero) 2% below it."""
    quantized = quantized_names(state)
    coarsest = recipe.with_sigmas({g: getattr(recipe, g).clip_sigmas * FIT_MAX_COARSENING for g in GROUPS})
    floor = 0.9 * sum(
        rounding_cost(state, [n for n in quantized if weight_group(n) == g], getattr(coarsest, g), {})[0]
        for g in GROUPS
    )
    require(
        floor <= budget,
        f"TARGET_BYTES: the model file needs at least {floor:.0f} bytes and {budget} remain after the code, even "
        f"with steps {FIT_MAX_COARSENING:g}x coarser (no export tried); lower QUANT_BITS_* or the model size",
        ArtifactTooLarge,
    )


def fit_artifact(
    state, hessians, recipe: ExportRecipe, budget: int, log, meta: dict | None = None
) -> tuple[bytes, ExportRecipe]:
    """The artifact of `recipe` if it fits in `budget` bytes, else of a coarsened recipe a little under it; each try is
    real and logged, its real saving per estimated byte calibrates the next. ArtifactTooLarge when coarsening ends."""
    check_reachable(state, recipe, budget)
    initial, slope, last = recipe, 1.0, None  # slope: artifact bytes saved per estimated byte saved
    for attempt in range(1, FIT_MAX_TRIES + 1):
        start, times = time.perf_counter(), {}
        stored = quantize_state(state, recipe, hessians)
        times["quantize"] = time.perf_counter() - start
        blob = pack_artifact(stored, recipe, times, meta)
        log(
            f"export_try:{attempt} {recipe.describe()} bytes:{len(blob)} budget:{budget} "
            f"{'fits' if len(blob) <= budget else 'over'} " + " ".join(f"{k}:{v:.1f}s" for k, v in times.items())
        )
        if len(blob) <= budget:
            return blob, recipe
        if last:
            slope = min(max((last[0] - len(blob)) / last[1], 0.25), 4.0)
        step = coarsen(state, hessians, recipe, initial, (len(blob) - budget * (1 - FIT_MARGIN)) / slope)
        if step is None:
            break
        recipe, last = step[0], (len(blob), step[1])
    raise ArtifactTooLarge(
        f"TARGET_BYTES: the model file needs {len(blob)} bytes and {budget} remain after the "
        f"code; steps up to {FIT_MAX_COARSENING:g}x coarser do not fit it ({attempt} tries); "
        "lower QUANT_BITS_* or the model size"
    )


# The settings that define the model's shape and function: an artifact carries them, and EVAL_ONLY uses them.
MODEL_KNOBS = (
    "vocab_size",
    "num_layers",
    "num_unique_layers",
    "loop_start",
    "loop_end",
    "model_dim",
    "num_heads",
    "num_kv_heads",
    "mlp_mult",
    "mlp_act",
    "rope_base",
    "logit_softcap",
    "xsa_last_n",
    "rope_dims",
    "ln_scale",
    "parallel_residual_start",
    "skip_gates_enabled",
    "layer_rows",
    "loop_embed",
    "smear_gate",
    "gate_window",
    "attn_gate",
    "doc_mask",
    "parallel_lanes_start",
)
# Model knobs younger than the artifact format: an artifact written before them holds a model without them
MODEL_KNOBS_ABSENT = dict(smear_gate=False, doc_mask=False, parallel_lanes_start=-1, attn_gate=0.0)


def model_meta(cfg: Config) -> dict:
    return dict(
        model={k: getattr(cfg, k) for k in MODEL_KNOBS},
        tokenizer_sha256=hashlib.sha256(Path(cfg.tokenizer_path).read_bytes()).hexdigest(),
    )


# The code a run ships. Its bytes count toward the artifact, so the run writes the packed, self-extracting copy of
# this file beside the artifact and counts that file: the same program without its comments and docstrings (the
# syntax tree unparsed), xz-compressed and base85-encoded, about a quarter of the readable file's bytes.


def code_file() -> Path:
    """The file that is run (a self-extracting wrapper, when one is shipped), as counted bytes."""
    return Path(getattr(sys.modules.get("__main__"), "__file__", None) or __file__)


PACKED_HEADER = "# Parameter Golf train_gpt.py, packed by the run; the readable source is in the repository\n"
PACKED_TEMPLATE = (
    'import lzma as L,base64 as B;exec(compile(L.decompress(B.b85decode("{payload}")).decode(),__file__,"exec"))\n'
)


def code_only(source: bytes) -> bytes:
    """The program of `source` without comments and docstrings: its syntax tree, docstrings removed, unparsed (and
    checked to parse back to that tree). Applied twice it gives the same bytes."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    code = ast.unparse(tree)
    if ast.dump(ast.parse(code)) != ast.dump(tree):  # never ship a program other than this one
        raise RuntimeError("ast.unparse did not round-trip this source; run with SHIP_CODE=readable")
    return code.encode()


def pack_code(source: bytes) -> str:
    """A two-line script that decompresses the program of `source` (code_only; xz, base85) and runs it as the main
    module: the code file a run ships by default (ship_code writes it; unpack_code gives the program back)."""
    payload = base64.b85encode(lzma.compress(code_only(source), preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return PACKED_HEADER + PACKED_TEMPLATE.format(payload=payload)


def unpack_code(code: bytes) -> bytes:
    """The source a code file runs: itself, or the program a packed file (pack_code) holds."""
    if not code.startswith(PACKED_HEADER.encode()):
        return code
    payload = re.search(rb'b85decode\("([^"]*)"\)', code)[1]
    return lzma.decompress(base64.b85decode(payload))


# ----------------------------------------------------------------------------------------------
# Training
#
# Warm up (compile, prime kernels) on real batches, restore the initial weights and optimizer state, then start the
# clock. Each step: micro-batches with gradient accumulation, optimizer steps with LR and momentum from the schedules,
# then one all-reduced elapsed time that every rank uses for the run fraction and the stop decision.
# ----------------------------------------------------------------------------------------------


class WeightAverages:
    """EMA and SWA of the parameters in fp32, over full-depth steps only. The EMA's horizon is a fraction of the run:
    a step advancing it by dt keeps exp(-dt / horizon) of the average, so a setting means the same for 5 min or 4 h."""

    def __init__(self, cfg: Config, model: GPT):
        self.cfg, self.model = cfg, model
        self.ema = self.swa = None  # lists of fp32 tensors once averaging starts
        self.swa_count, self.last_t = 0, 0.0

    @torch.no_grad()
    def update(self, step: int, t: float, full_depth: bool) -> None:
        params = [p.detach().float() for p in self.model.parameters()]
        if full_depth and self.cfg.ema_horizon > 0:  # started at the weights (a lerp between equal ones is exact)
            self.ema = self.ema or [p.clone() for p in params]
            torch._foreach_lerp_(self.ema, params, 1 - math.exp(-(t - self.last_t) / self.cfg.ema_horizon))
        if full_depth and 0 < self.cfg.swa_start <= t and step % self.cfg.swa_every == 0:
            self.swa = self.swa or [torch.zeros_like(p) for p in params]
            torch._foreach_add_(self.swa, params)
            self.swa_count += 1
        self.last_t = t

    def averaged(self, choice: str) -> list[torch.Tensor] | None:
        if choice == "swa" and self.swa_count:
            return [s / self.swa_count for s in self.swa]
        return self.ema if choice == "ema" else None

    def checkpoint(self) -> dict:
        """Float weights for EVAL_ONLY: the last ones and every average that was taken."""
        names = [n for n, _ in self.model.named_parameters()]
        state = {"last": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        for choice in ("ema", "swa"):
            averaged = self.averaged(choice)
            state[choice] = None if averaged is None else dict(zip(names, (a.cpu() for a in averaged)))
        return state

    def state_dict(self) -> dict:  # for a resumable checkpoint: the sums and counts, not the averages
        return dict(ema=self.ema, swa=self.swa, swa_count=self.swa_count, last_t=self.last_t)

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.swa, self.swa_count, self.last_t = (state[k] for k in ("ema", "swa", "swa_count", "last_t"))

    @torch.no_grad()
    def export_into_model(self) -> str:
        """Load the chosen weights into the model; returns what was exported (for the log)."""
        choice = self.cfg.export_weights
        averaged = self.averaged(choice)
        if averaged is None:
            return "last" if choice == "last" else f"last (no {choice} average was taken: no full-depth steps in range)"
        torch._foreach_copy_(list(self.model.parameters()), averaged)
        return f"{choice} ({self.swa_count} snapshots)" if choice == "swa" else f"ema (horizon {self.cfg.ema_horizon})"


@dataclasses.dataclass
class TrainState:
    step: int = 0
    elapsed_ms: float = 0.0
    last_loss: float = float("nan")
    first_loss: float = float("nan")
    passes: int = 0  # core passes of the plan in use
    full_depth_from: int | None = None  # first step at full depth: averaging (EMA/SWA) may start here
    phase_ms: dict = dataclasses.field(default_factory=dict)  # passes -> every step time at that depth


def train_step(model, loader: ShuffledLoader, rt: Runtime, cfg: Config, plan: Plan, optimizers) -> torch.Tensor:
    total = torch.zeros((), device=rt.device)
    for micro in range(cfg.micro_steps):
        x, y = loader.next_batch()
        if rt.distributed:
            model.require_backward_grad_sync = micro == cfg.micro_steps - 1
        with rt.autocast():
            loss = model(x, y, plan)
        (loss / cfg.micro_steps).backward()
        loader.prefetch()
        total += loss.detach()
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / cfg.micro_steps


def set_schedules(cfg: Config, optimizers, t: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier(cfg, t)
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(cfg, t)


def warmup(model, base: GPT, cfg: Config, rt: Runtime, plans: dict[int, Plan], optimizers, make_loader) -> float:
    """Run WARMUP_STEPS real steps cycling through every depth phase's plan (compiles and primes
    each, so a switch mid-run costs no compilation), then restore the initial state."""
    if cfg.warmup_steps == 0:
        return 0.0
    order = training_repeats(cfg)
    steps = max(cfg.warmup_steps, len(order))
    start = time.perf_counter()
    saved_model, saved_opts = copy.deepcopy((base.state_dict(), [opt.state_dict() for opt in optimizers]))
    loader = make_loader()
    for i in range(steps):
        train_step(model, loader, rt, cfg, plans[order[i % len(order)]], optimizers)
        if i < len(order) or i == steps - 1:
            rt.log(f"warmup_step:{i + 1}/{steps} passes:{order[i % len(order)]} elapsed:{rt.clock() - start:.1f}s")
    base.load_state_dict(saved_model)
    for opt, saved in zip(optimizers, saved_opts):
        opt.load_state_dict(saved)
    return rt.clock() - start


def log_step(rt: Runtime, cfg: Config, state: TrainState, loss: float, t: float) -> None:
    step_avg = state.elapsed_ms / max(state.step, 1)
    tokens_per_s = cfg.train_batch_tokens * state.step / max(state.elapsed_ms / 1000, 1e-9)
    eta_s = (cfg.iterations - state.step) * step_avg / 1000 if cfg.iterations else math.inf
    if cfg.max_wallclock_seconds > 0:
        eta_s = min(eta_s, (1 - t) * training_seconds(cfg))
    rt.log(
        f"step:{state.step}/{cfg.iterations or '?'} train_loss:{loss:.4f} train_time:{state.elapsed_ms:.0f}ms "
        f"step_avg:{step_avg:.2f}ms tok/s:{tokens_per_s:.0f} eta:{eta_s:.0f}s"
    )


def choose_depth(cfg: Config, rt: Runtime, state: TrainState, t: float) -> None:
    """Set the passes for the next step from the agreed run fraction; log a switch."""
    passes = depth_phase(cfg, t)
    if state.passes and passes != state.passes:
        agreed = rt.all_equal((state.step + 1, passes))
        rt.log(f"depth_switch step:{state.step + 1} t:{t:.3f} passes:{state.passes}->{passes} ranks_agree:{agreed}")
    state.passes = passes
    if passes == cfg.repeats and state.full_depth_from is None:
        state.full_depth_from = state.step + 1


def log_phase_times(rt: Runtime, cfg: Config, state: TrainState) -> None:
    """Median step time per depth phase, and what the run would have done at full depth only."""
    for passes, times in state.phase_ms.items():
        rt.log(f"phase passes:{passes} steps:{len(times)} median_step_ms:{sorted(times)[len(times) // 2]:.1f}")
    full = state.phase_ms.get(cfg.repeats)
    if len(state.phase_ms) > 1 and full and len(full) > 2:
        fixed_steps = int(state.elapsed_ms / sorted(full)[len(full) // 2])
        rt.log(
            f"progressive_depth steps:{state.step} fixed_full_depth_estimate:{fixed_steps} "
            f"gained:{state.step - fixed_steps}"
        )


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """Write under a temporary name, then rename: a kill leaves the previous file or the new one, never a part. A write
    that fails (a full disk, a file size limit) stops the run in one line naming the file, the previous one kept."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        temporary.unlink(missing_ok=True)
        raise DataError(f"{path}: could not be written ({exc})") from None
    os.replace(temporary, path)


def save_checkpoint(folder: Path, cfg: Config, rt: Runtime, parts: dict, state: TrainState) -> None:
    """Rank 0 writes what all ranks hold alike (weights, averages, Adam), each rank its Muon momentum (only a matrix's
    owner has it): a sha256, then a torch.save. Once all are whole, rank 0 names them in checkpoint.json and removes
    older ones. No random state: training draws none (the loader's order follows from SEED and the step)."""
    start, buffer = time.perf_counter(), io.BytesIO()
    folder.mkdir(exist_ok=True)
    mine = {name: part.state_dict() for name, part in parts.items() if rt.main or isinstance(part, Muon)}
    torch.save(dict(state=dataclasses.asdict(state), **mine), buffer)
    payload = buffer.getbuffer()
    write_whole(
        folder / f"step{state.step}.rank{rt.rank}.pt",
        lambda p: p.write_bytes(hashlib.sha256(payload).digest() + payload),
    )
    if rt.distributed:
        dist.barrier()
    if rt.main:
        manifest = json.dumps(dict(step=state.step, config=dataclasses.asdict(cfg)))
        write_whole(folder / "checkpoint.json", lambda p: p.write_text(manifest))
        for old in set(folder.glob("step*")) - set(folder.glob(f"step{state.step}.*")):
            old.unlink()
    if rt.distributed:  # no rank exits on a stop before the checkpoint counts: torchrun would then kill rank 0
        dist.barrier()
    rt.log(f"checkpoint step:{state.step} time:{time.perf_counter() - start:.2f}s folder:{folder}")


def load_checkpoint(cfg: Config, rt: Runtime, parts: dict, loader: ShuffledLoader) -> TrainState:
    """RESUME: every rank loads rank 0's file and its own of the checkpoint that checkpoint.json names."""
    folder = Path(cfg.resume) / "checkpoint"
    step = json.loads((folder / "checkpoint.json").read_text())["step"]
    files = {r: folder / f"step{step}.rank{r}.pt" for r in sorted({0, rt.rank})}
    blobs = {r: memoryview(f.read_bytes() if f.is_file() else b"") for r, f in files.items()}
    bad = rt.agree_max(max([-1] + [r for r, b in blobs.items() if hashlib.sha256(b[32:]).digest() != b[:32]]))
    if bad >= 0:  # every rank stops
        raise UserError(f"RESUME={cfg.resume}: the checkpoint file of rank {bad:.0f} is missing, partial or corrupt")
    snapshot = {
        k: v
        for blob in blobs.values()  # rank 0's shared parts, then this rank's own Muon momentum
        for k, v in torch.load(io.BytesIO(blob[32:]), map_location=rt.device, weights_only=True).items()
    }
    try:
        for name, part in parts.items():
            part.load_state_dict(snapshot[name])
        state = TrainState(**snapshot["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"RESUME={cfg.resume}: checkpoint written by another version of this script ({exc})") from None
    loader.skip(state.step * cfg.micro_steps)  # its position follows from the steps trained
    rt.log(f"resume step:{state.step} train_time:{state.elapsed_ms:.0f}ms from:{folder}")
    return state


def train(
    model,
    base: GPT,
    cfg: Config,
    rt: Runtime,
    plans: dict[int, Plan],
    optimizers,
    loader: ShuffledLoader,
    score,
    averages: WeightAverages,
    out: Path,
) -> TrainState:
    parts = dict(model=base, averages=averages, **{f"optimizer{i}": o for i, o in enumerate(optimizers)})
    state = load_checkpoint(cfg, rt, parts, loader) if cfg.resume else TrainState()
    clock, checkpoint_ms = rt.clock(), state.elapsed_ms
    stop = cfg.max_wallclock_seconds > 0 and state.elapsed_ms >= 1000 * training_seconds(cfg)  # resumed at the end
    while True:
        last = stop or (cfg.iterations and state.step >= cfg.iterations)
        if last or (cfg.val_loss_every and state.step and state.step % cfg.val_loss_every == 0):
            state.elapsed_ms = rt.agree_max(state.elapsed_ms + 1000 * (rt.clock() - clock))
            val_loss, val_bpb = score()
            rt.log(
                f"step:{state.step}/{cfg.iterations or '?'} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{state.elapsed_ms:.0f}ms step_avg:{state.elapsed_ms / max(state.step, 1):.2f}ms"
            )
            clock = rt.clock()
        if last:  # a signal from now on stops at once; one that came before (in the final validation) is polled here
            TRAINING_LOOP[0] = False
            if rt.agree_max(float(bool(STOP_SIGNALS))):
                save_checkpoint(out / "checkpoint", cfg, rt, parts, state)
                stop_for_signal(state, out)
            return state
        t = run_fraction(cfg, state.step, state.elapsed_ms / 1000)  # agreed across ranks
        choose_depth(cfg, rt, state, t)
        set_schedules(cfg, optimizers, t)
        loss = train_step(model, loader, rt, cfg, plans[state.passes], optimizers)
        state.step += 1
        now = rt.clock()
        elapsed_ms, diverged, stop_asked = rt.agree_max(
            state.elapsed_ms + 1000 * (now - clock), float(not torch.isfinite(loss)), float(bool(STOP_SIGNALS))
        )
        if diverged:  # agreed across ranks: every rank stops here, and nothing is exported
            raise Diverged(
                f"the training loss is not finite at step {state.step} (on some rank); stopping without "
                "an export: lower MATRIX_LR / SCALAR_LR or set GRAD_CLIP_NORM"
            )
        state.phase_ms.setdefault(state.passes, []).append(elapsed_ms - state.elapsed_ms)
        state.elapsed_ms, clock = elapsed_ms, now
        averages.update(state.step, run_fraction(cfg, state.step, elapsed_ms / 1000), state.passes == cfg.repeats)
        stop = cfg.max_wallclock_seconds > 0 and elapsed_ms >= 1000 * training_seconds(cfg)
        if state.step == 1 or state.step % cfg.train_log_every == 0 or stop or state.step == cfg.iterations:
            if rt.distributed:  # the loss of the whole global batch, not rank 0's share
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            state.last_loss = loss.item()
            state.first_loss = state.last_loss if state.step == 1 else state.first_loss
            log_step(rt, cfg, state, state.last_loss, run_fraction(cfg, state.step, elapsed_ms / 1000))
        if stop:
            rt.log(f"stopping_early: wallclock_cap train_time:{elapsed_ms:.0f}ms step:{state.step}/{cfg.iterations}")
        if stop_asked or (cfg.checkpoint_every and elapsed_ms - checkpoint_ms >= 1000 * cfg.checkpoint_every):
            save_checkpoint(out / "checkpoint", cfg, rt, parts, state)
            clock, checkpoint_ms = time.perf_counter(), elapsed_ms  # writing it is not training time
        if stop_asked:  # agreed across ranks, like every decision that stops training
            stop_for_signal(state, out)


def stop_for_signal(state: TrainState, out: Path) -> None:
    """Training stops on a stop signal, agreed across ranks, once its checkpoint is written: exit code 5."""
    SIGNAL_STATE["stopping"] = True  # the checkpoint is whole: a later signal has nothing left to stop
    raise Interrupted(
        f"{' and '.join(sorted(set(STOP_SIGNALS)))} received: training stopped after step "
        f"{state.step}, wrote a checkpoint, exported nothing; continue with RESUME={out}"
    )


STOP_SIGNALS: list[str] = []  # one name per delivery (sort_stop_signal); the training loop polls it every step
TRAINING_LOOP = [False]  # whether that loop is running (it then stops every rank on the same step)
# Signals that arrive within this many seconds of a delivery's first are copies of it. torchrun's copy follows a job's
# own signal by about a millisecond (docs/perf.md), a person's second Ctrl-C by seconds: 1 s leaves a loaded host,
# slow to schedule torchrun, a thousand times that margin and still stops at once on a deliberate second signal.
SIGNAL_WINDOW_S = 1.0
SIGNAL_STATE = dict(delivered_at=-math.inf, stop_now=False, stopping=False, pipe=-1, hint="")
SIGNAL_LOCK = threading.RLock()  # the watcher thread and the handler read the pipe and sort what they read under it


def watch_stop_signals() -> None:
    """SIGTERM and SIGINT as schedulers send them: to torchrun (which forwards them to every worker), to the workers,
    or to every process of the job, when each worker gets two within milliseconds (its own and torchrun's copy).
    sort_stop_signal counts signals by arrival time. Python runs a handler only between bytecodes of the main thread,
    which may be seconds late (a CUDA sync, a collective, a checkpoint's write): so a thread, woken by the byte that
    the C-level handler writes to the wakeup pipe, takes the times; the handler sorts what the thread has not."""
    STOP_SIGNALS.clear()
    read_end, write_end = os.pipe()
    SIGNAL_STATE.update(delivered_at=-math.inf, stop_now=False, stopping=False, pipe=read_end, hint="")
    os.set_blocking(read_end, False)  # whichever of the two readers comes second finds it empty
    os.set_blocking(write_end, False)  # a signal handler must never wait on a full pipe
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop_signal)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:  # until the pipe's write end is closed
        while select.select([read_end], [], [])[0] and read_stop_signals(read_end):
            pass

    threading.Thread(target=watch, name="stop_signals", daemon=True).start()


def read_stop_signals(read_end: int) -> bool:
    """Sort the signals whose bytes wait in the pipe as arriving now; False once its write end is closed."""
    with SIGNAL_LOCK:
        try:
            arrived = os.read(read_end, 64)
        except BlockingIOError:  # the other reader took them
            return True
        for number in arrived:
            if number in (signal.SIGTERM, signal.SIGINT):
                sort_stop_signal(number, time.monotonic())
        return bool(arrived)


def sort_stop_signal(number: int, now: float) -> None:
    """Count a signal that arrived at `now` (time.monotonic()). A copy of the delivery under way, or any signal once
    this process is stopping, counts for nothing. A new delivery during training is polled by the loop (every rank
    finishes the step and writes a checkpoint); one elsewhere, or a second delivery (even while that checkpoint is
    being written: the previous one stays), stops at once."""
    if SIGNAL_STATE["stopping"] or now - SIGNAL_STATE["delivered_at"] < SIGNAL_WINDOW_S:
        return
    SIGNAL_STATE["delivered_at"] = now
    STOP_SIGNALS.append(signal.Signals(number).name)
    SIGNAL_STATE["stop_now"] = not TRAINING_LOOP[0] or len(STOP_SIGNALS) > 1


def on_stop_signal(number: int, frame) -> None:
    """Python's handler (main thread): sort what the watcher has not, then raise if the run stops at once."""
    read_stop_signals(SIGNAL_STATE["pipe"])
    if SIGNAL_STATE["stop_now"] and not SIGNAL_STATE["stopping"]:
        SIGNAL_STATE["stopping"] = True
        if len(STOP_SIGNALS) > 1:
            raise Interrupted(f"{STOP_SIGNALS[-1]} received again: stopped at once; the last whole checkpoint stays")
        raise Interrupted(
            f"{STOP_SIGNALS[-1]} received outside a training step: stopped; no partial file is left"
            f"{SIGNAL_STATE['hint']}"
        )


# ----------------------------------------------------------------------------------------------
# The run
#
# main() checks the inputs on the CPU, sets up the ranks and the run folder, then calls run(): load the data, build
# the model, check that the evaluations fit their budget, warm up, train, export the artifact, reload it and score it.
# Each phase is a function below, in that order.
# ----------------------------------------------------------------------------------------------


def resolve_out_dir(cfg: Config) -> Path | None:
    """The run's folder when it is fixed by RUN_ID/OUT_DIR (checked before any GPU work), else None
    (rank 0 then picks a fresh name). An existing non-empty folder is refused, never overwritten."""
    if cfg.resume:  # continued where it ran (check_inputs checks its checkpoint)
        check_writable("RESUME", Path(cfg.resume))
        return Path(cfg.resume)
    if cfg.out_dir:
        out, name = Path(cfg.out_dir), "OUT_DIR"
    elif cfg.run_id:
        out, name = Path("runs") / cfg.run_id, "RUN_ID"
    else:
        check_writable("RUN_ID", Path("runs"))
        return None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        state = "and is not empty" if out.is_dir() else "as a file"
        raise UserError(f"{name}: output folder {out} already exists {state}; choose another")
    check_writable(name, out)
    return out


def check_writable(name: str, folder: Path) -> None:
    """Refuse a run folder that cannot be made or written (under a file, on a read-only filesystem), before any work:
    its nearest existing ancestor must be a folder this process may write."""
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(
            f"{name}: cannot make or write the run folder {folder}: {nearest} is "
            f"{'not a folder' if not nearest.is_dir() else 'not writable'}"
        )


def check_inputs(cfg: Config, rank: int = 0) -> None:
    """Everything that can be wrong with the inputs, checked on the CPU before any GPU work. Each rank reads the token
    ids of its share of the shards (main agrees on what the ranks found)."""
    require(
        not cfg.eval_only or Path(cfg.eval_only).is_file(),
        f"EVAL_ONLY={cfg.eval_only}: {'a folder, not a file' if Path(cfg.eval_only).is_dir() else 'file not found'}",
    )
    find_shards(cfg.data_path, "train")
    total = sum(read_shard_header(p) for p in find_shards(cfg.data_path, "val"))
    check_sidecars_match(cfg, load_tokenizer(cfg))
    require(
        total - 1 >= cfg.train_seq_len,
        f"DATA_PATH={cfg.data_path}: validation split has {total} tokens, shorter than one sequence "
        f"(TRAIN_SEQ_LEN={cfg.train_seq_len} + 1)",
        DataError,
    )
    summary = Path(cfg.data_path) / "summary.json"  # data/build_shards.py writes it; downloaded folders have none
    built_with = read_json(summary, "DATA_PATH").get("tokenizer", {}) if summary.is_file() else {}
    require(
        built_with.get("sha256") in (None, model_meta(cfg)["tokenizer_sha256"]),
        f"TOKENIZER_PATH={cfg.tokenizer_path}: not the tokenizer of DATA_PATH={cfg.data_path}, "
        f"{built_with.get('path')}",
    )
    if cfg.resume:
        check_resumable(cfg)
    require(
        codec_installed(cfg.compressor),
        f"COMPRESSOR={cfg.compressor}: its package is missing: pip install -r requirements.txt",
    )
    shards = find_shards(cfg.data_path, "train") + find_shards(cfg.data_path, "val")
    for path in shards[rank :: cfg.world_size]:  # the longest check last
        check_shard_tokens(path, cfg.vocab_size)
    if cfg.eval_only:  # read whole now, so that every rank refuses a bad file together (eval_only reads it again)
        read_eval_only(cfg)


def read_json(path: Path, name: str) -> dict:
    """A JSON object the run reads (a checkpoint's manifest, a data folder's summary), or one line naming it."""
    with contextlib.suppress(ValueError):
        if isinstance(found := json.loads(path.read_text()), dict):
            return found
    raise DataError(f"{name}: {path} is not a JSON object as this script writes it (damaged?)")


# What RESUME may change: where the run writes, logs and compiles, and EXPORT_RESERVE_SECONDS (the run measures its
# reserve again); every other setting is the interrupted run's.
RESUME_FREE_KNOBS = ("out_dir", "resume", "checkpoint_every", "train_log_every", "val_loss_every", "compile",
                     "attn_backend", "export_reserve_seconds")  # fmt: skip


def check_resumable(cfg: Config) -> None:
    """RESUME: a complete checkpoint, written with these settings."""
    manifest = Path(cfg.resume) / "checkpoint" / "checkpoint.json"
    require(manifest.is_file(), f"RESUME={cfg.resume}: no complete checkpoint there ({manifest} not found)")
    saved = read_json(manifest, "RESUME").get("config", {})
    ours = json.loads(json.dumps(dataclasses.asdict(cfg)))
    differ = [k.upper() for k, v in saved.items() if k not in RESUME_FREE_KNOBS and ours.get(k, v) != v]
    require(not differ, f"RESUME={cfg.resume}: {', '.join(differ)} differ from the interrupted run's settings")


def setup_runtime() -> Runtime:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, cuda = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        join_process_group(rank, world_size, "nccl" if cuda else "gloo", device if cuda else None)
    return Runtime(rank, world_size, local_rank, device)


JOIN_TIMEOUT_S = 120  # how long ranks started without torchrun wait for each other (join_process_group says why)


def join_process_group(rank: int, world_size: int, backend: str, device) -> None:
    """init_process_group. torchrun has started every rank and its agent holds the store: torch's own path. Ranks
    from another launcher (srun, mpirun), or WORLD_SIZE and RANK left in a plain `python train_gpt.py`'s environment,
    meet in a store made here: torch's env:// waits 30 minutes for peers that may never come. Launchers start every
    rank within seconds, but a cold import of torch from a network filesystem can take tens of seconds (3 s from a
    warm local disk here): the peers get JOIN_TIMEOUT_S, then the run is refused naming the variables. A person who
    left WORLD_SIZE set waits two minutes, not thirty; Ctrl-C works while it waits."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.init_process_group(backend, device_id=device)
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    launch = f"WORLD_SIZE={world_size}, RANK={rank}, MASTER_ADDR={address!r}, MASTER_PORT={port!r}"
    require(
        bool(address) and port.isdecimal(),
        f"{launch}: several processes need MASTER_ADDR and MASTER_PORT; "
        "start them with torchrun, or unset WORLD_SIZE and RANK to run one",
    )
    stderr, joining = os.dup(2), ThreadPoolExecutor(1)  # the store's C++ client logs every retry on stderr
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        store = joining.submit(
            dist.TCPStore,
            address,
            int(port),
            world_size,
            rank == 0,
            multi_tenant=True,
            timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
        ).result()  # a signal interrupts it
    except dist.DistError:
        raise ConfigError(
            f"{launch}: the other ranks did not join within {JOIN_TIMEOUT_S} s; start them with "
            "torchrun, or unset WORLD_SIZE and RANK to run one process"
        ) from None
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        joining.shutdown(wait=False)
    store.set_timeout(default_pg_timeout)  # as torch's env:// store: the join's timeout was for the join only
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device)


def open_run_folder(cfg: Config, rt: Runtime, out: Path | None) -> Path:
    """Rank 0 makes the folder (a fresh name unless RUN_ID/OUT_DIR fixed it) and claims its log file; every rank
    learns the folder, and all stop when the claim failed."""
    claim = [out, False]
    if rt.main:
        out = out or Path("runs") / f"{time.strftime('%Y%m%d_%H%M%S')}_{os.urandom(2).hex()}"
        out.mkdir(parents=True, exist_ok=True)
        rt.log_path = out / f"{cfg.run_id or out.name}.txt"
        try:  # created exclusively: of two runs started at once with one RUN_ID, the second stops here
            rt.log_path.open("a" if cfg.resume else "x").close()
        except FileExistsError:
            rt.log_path = None
        claim = [out, rt.log_path is not None]
    if rt.distributed:
        dist.broadcast_object_list(claim, src=0)
    out, claimed = claim
    require(claimed, f"RUN_ID={cfg.run_id or out.name}: another run is already writing to {out}; choose another")
    return out


def attention_backend_name(cfg: Config, device_type: str) -> str:
    """The compiled blocks' attention kernel, as the log header names it; build_model gives GPT FA3 for fa3*."""
    if cfg.compile and device_type == "cuda" and cfg.attn_backend == "auto":
        with contextlib.suppress(ImportError):  # FlashAttention 3, installed on the records' H100s
            importlib.import_module("flash_attn_interface")
            return "fa3_varlen" if cfg.doc_mask else "fa3"
    return "flex_attention" if cfg.doc_mask and cfg.compile and device_type == "cuda" else "sdpa"


def log_header(cfg: Config, rt: Runtime) -> None:
    """Config, the source exactly as run (code_bytes of it follow the config line), versions and
    hardware, then the key:value lines a reviewer checks (scripts/runlog.py parses them)."""
    code = code_file()
    source = code.read_bytes()
    rt.log("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    rt.log(source.decode("utf-8"), console=False)
    versions = f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__}"
    rt.log(
        "=" * 100 + f"\n{versions} platform:{platform.platform()} cpu_threads:{torch.get_num_threads()}", console=False
    )
    cuda = rt.device.type == "cuda"
    if cuda:  # nvidia-smi: CUDA's version and the GPUs
        try:
            rt.log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout, console=False)
        except (OSError, subprocess.TimeoutExpired):
            rt.log("nvidia-smi: unavailable", console=False)
    rt.log(f"code_sha256:{hashlib.sha256(source).hexdigest()} code_bytes:{len(source)} code_file:{code.name}")
    gpus, gpu = (torch.cuda.device_count(), torch.cuda.get_device_name(rt.device)) if cuda else (0, "none")
    backend = attention_backend_name(cfg, rt.device.type)
    rt.log(
        f"torch_version:{torch.__version__} cuda_version:{torch.version.cuda} attention_backend:{backend} "
        f"world_size:{rt.world_size} gpu_count:{gpus} gpu:{gpu}"
    )
    shards = find_shards(cfg.data_path, "train")
    rt.log(f"train_shards:{len(shards)} train_shard_tokens:{sum(read_shard_header(p) for p in shards)}")


def build_model(cfg: Config, rt: Runtime) -> tuple[GPT, nn.Module]:
    """The model (`base`) and what training calls (DDP around it on several ranks)."""
    torch.manual_seed(cfg.seed)
    cuda = rt.device.type == "cuda"
    fa3 = attention_backend_name(cfg, rt.device.type).startswith("fa3")
    with rt.device:  # initialized where it runs: CPU QR for the orthogonal init took minutes with 4 runs on one host
        base = GPT(cfg, torch.bfloat16 if cuda else torch.float32, cfg.compile and cuda, fa3)
    use_flash_attention_if_sound(cfg, rt, base)
    model = base
    if rt.distributed:
        device_ids = [rt.local_rank] if cuda else None
        # GPT holds no buffers, so DDP's defaults broadcast nothing (torch 2.13 warns on broadcast_buffers)
        model = nn.parallel.DistributedDataParallel(base, device_ids=device_ids)
    params = sum(p.numel() for p in base.parameters())
    if not cuda and params > 5_000_000:
        rt.log(
            f"WARNING: running on the CPU with {params:,} parameters: expect hours; "
            "see data/README.md for a tiny CPU recipe"
        )
    rt.log(
        f"model_params:{params} unique_blocks:{len(base.blocks)} plan:{list(plan_for(cfg, cfg.repeats).blocks)} "
        f"repeats:{cfg.repeats} world_size:{rt.world_size} micro_steps:{cfg.micro_steps} "
        f"micro_batch_seqs:{cfg.micro_batch_seqs}"
    )
    return base, model


def flash_attention_fault(cfg: Config, fa3, device) -> str | None:
    """None when FlashAttention 3 gives PyTorch's attention (output and gradients, to bf16 rounding) on random bf16
    tokens of this run's shapes (dense, and with DOC_MASK its varlen kernel on documents of random lengths), else
    what went wrong. A broken build or a kernel for another GPU then costs a slower run, not a wrong one."""
    generator = torch.Generator(device=device).manual_seed(0)
    B, T, H, KV = 2, cfg.train_seq_len, cfg.num_heads, cfg.num_kv_heads
    D = cfg.model_dim // H
    fast, reference = (Attention(cfg.model_dim, H, KV, 1.0, False, module) for module in (fa3, None))
    ids = torch.randint(2, cfg.vocab_size, (B, T), device=device, generator=generator)
    ids[:, torch.randint(0, T, (8,), device=device, generator=generator)] = BOS_ID  # 8 document boundaries a row
    masks = [(CAUSAL, CAUSAL)]
    if cfg.doc_mask:
        masks.append((AttentionMask("varlen", varlen_segments(ids)), AttentionMask("dense", document_mask(ids))))
    for fast_mask, reference_mask in masks:
        q, k, v = (
            torch.randn(B, T, h, D, device=device, generator=generator, dtype=torch.bfloat16) for h in (H, KV, KV)
        )
        cotangent = torch.randn(B, T, H, D, device=device, generator=generator, dtype=torch.bfloat16)
        results = []
        for attention, mask in ((fast, fast_mask), (reference, reference_mask)):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            try:
                out = attention.attend(*inputs, mask)
                grads = torch.autograd.grad((out.float() * cotangent.float()).sum(), inputs)
            except Exception as exc:  # any failure of the fast path: fall back
                return f"{fast_mask.kind} attention raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            results.append([out, *grads])
        for name, got, want in zip(("output", "dq", "dk", "dv"), *results):
            got, want = got.detach().float(), want.detach().float()
            error = float((got - want).norm() / want.norm().clamp_min(1e-12))
            if not error <= 2e-2:  # bf16 kernels agree to ~5e-3; NaN fails too
                return f"{fast_mask.kind} attention's {name} differs from PyTorch's by {error:.2e} (relative)"
    return None


def use_flash_attention_if_sound(cfg: Config, rt: Runtime, base: GPT) -> None:
    """Check FlashAttention 3 against PyTorch's attention before any compile (every rank, agreed): on a fault, one
    log line and the whole run uses SDPA / flex_attention instead."""
    if not base.fa3:
        return
    fault = flash_attention_fault(cfg, base.blocks[0].attn.fa3, rt.device)
    if rt.agree_max(float(fault is not None)) == 0:
        rt.log("attention_check fa3: output and gradients match PyTorch's attention")
        return
    rt.log(f"attention_check fa3: {fault or 'failed on another rank'}; this run uses PyTorch's attention instead")
    base.fa3 = False
    for block in base.blocks:
        block.attn.fa3 = None


def check_free_space(rt: Runtime, base: GPT, out: Path) -> None:
    """Refuse a run whose files may not fit: per rank two checkpoints (the last stays until the next is whole) of at
    most 5 floats a weight (itself, EMA, SWA, 2 optimizer states), then the float checkpoint and the artifact."""
    need = (10 * rt.world_size + 3) * 4 * sum(p.numel() for p in base.parameters()) + ARTIFACT_LIMIT_BYTES
    free = -rt.agree_max(-shutil.disk_usage(out).free)  # the least on any rank
    if free < need:
        raise Refused(f"{out}: {free / 1e9:.2f} GB free on its disk; the run may write {need / 1e9:.2f} GB")


def run(cfg: Config, rt: Runtime, out: Path) -> dict:
    """A training run: train, then export, reload and score (TRAIN_ONLY: the score before export)."""
    val_tokens = load_val_tokens(cfg).to(rt.device)
    tables = val_byte_tables(cfg, rt, val_tokens)
    base, model = build_model(cfg, rt)
    optimizers = build_optimizers(cfg, base, rt.rank, rt.world_size, fused=rt.device.type == "cuda")
    plans = {passes: plan_for(cfg, passes) for passes in training_repeats(cfg)}
    make_loader = partial(make_train_loader, cfg, rt)
    evaluate_with = evaluator(cfg, rt, base, val_tokens, tables)
    round_trip_score = partial(evaluate_with, cfg.train_seq_len, cfg.train_seq_len)  # the score during training
    check_eval_budget(base, cfg, rt, document_bounds(val_tokens))
    check_free_space(rt, base, out)
    warmup_s = warmup(model, base, cfg, rt, plans, optimizers, make_loader)
    rt.log(f"warmup_time:{warmup_s:.1f}s (compile and priming; not counted as training time)")
    calibration_per_rank, reserve_s = calibration_batches(cfg, rt, base, make_loader)
    cfg = dataclasses.replace(cfg, export_reserve_seconds=reserve_s)  # the training clock stops at what it needs
    averages = WeightAverages(cfg, base)
    TRAINING_LOOP[0] = True  # a stop signal now waits for the end of the step in flight
    try:
        state = train(model, base, cfg, rt, plans, optimizers, make_loader(), round_trip_score, averages, out)
    finally:
        TRAINING_LOOP[0] = False
    peak_mib = log_training_end(cfg, rt, base, state)
    if rt.main:  # the float checkpoint replaces the resumable one
        write_whole(out / "final_model.float.pt", partial(torch.save, averages.checkpoint()))
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    SIGNAL_STATE["hint"] = f"; training had ended: EVAL_ONLY={out / 'final_model.float.pt'} exports and scores it"
    exported = averages.export_into_model()
    rt.log(f"export_weights:{exported}")
    results = []
    if not exported.startswith("last") or cfg.train_only:
        start = time.perf_counter()
        val_loss, val_bpb = round_trip_score()
        rt.log(f"averaged_weights val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} (before export)")
        results.append(("pre_export", val_loss, val_bpb, 1000 * (time.perf_counter() - start)))
    if cfg.train_only:  # the score is the pre-export one; the float checkpoint is written, nothing is shipped
        code_bytes, model_bytes, artifact = len(shipped_code(cfg)), 0, None
    else:
        code_bytes = ship_code(cfg, rt, out)
        model_bytes, artifact = export_and_reload(base, cfg, rt, out, code_bytes, calibration_per_rank)
        results = final_evaluations(cfg, rt, evaluate_with)
    return log_summary(
        rt,
        results,
        code_bytes,
        model_bytes,
        artifact,
        train_tokens=state.step * cfg.train_batch_tokens,
        steps=state.step,
        train_time_ms=round(state.elapsed_ms),
        warmup_time_s=round(warmup_s, 2),
        first_train_loss=state.first_loss,
        last_train_loss=state.last_loss,
        world_size=rt.world_size,
        peak_memory_mib=round(peak_mib),
        seed=cfg.seed,
        export_weights=exported,
    )


def evaluator(cfg: Config, rt: Runtime, base: GPT, val_tokens: torch.Tensor, tables: ByteTables) -> Callable:
    """evaluate(window, stride, ...) of `base` on the validation tokens at the evaluation's depth, over the ranks."""
    plan = plan_for(cfg, cfg.eval_passes)
    return partial(evaluate, base, plan, val_tokens, cfg, rt.rank, rt.world_size, tables, rt.autocast)


def log_training_end(cfg: Config, rt: Runtime, base: GPT, state: TrainState) -> float:
    """Step times per depth phase, whether the ranks hold identical weights, peak memory (returned, MiB), compiles."""
    log_phase_times(rt, cfg, state)
    checksum = 0.0  # equal on every rank exactly when the ranks hold the same weights (to float64 sums)
    for p in base.parameters():
        weights = p.detach().double()
        checksum += weights.abs().sum().item() + weights.sum().item()
    rt.log(
        f"rank_param_checksum:{checksum!r} ranks_identical:{rt.all_equal(checksum)} "
        f"full_depth_from_step:{state.full_depth_from}"
    )
    peak_mib = 0.0
    if rt.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(rt.device) / 2**20
        rt.log(f"peak memory allocated: {peak_mib:.0f} MiB")
    rt.log(compile_report())
    return peak_mib


def artifact_name(cfg: Config) -> str:
    """The export's name in its file and log lines: 'int6' when every group has the same width, else 'mixed', then
    'gptq' with GPTQ, and the codec (final_model.mixedgptq_brotli.ptz, final_int6_zstd_sliding)."""
    widths = {cfg.quant_bits_attn, cfg.quant_bits_mlp, cfg.quant_bits_embed}
    label = f"int{widths.pop()}" if len(widths) == 1 else "mixed"
    return f"{label}{'gptq' if cfg.gptq else ''}_{cfg.compressor}"


def shipped_code(cfg: Config, source: bytes | None = None) -> bytes:
    """The code file a record ships: with SHIP_CODE=packed the packed copy of `source` (the program run, read when not
    given), else the source itself (a packed file run as itself ships the same packed bytes: packing is deterministic
    and code_only idempotent)."""
    source = unpack_code(code_file().read_bytes()) if source is None else source
    return pack_code(source).encode() if cfg.ship_code == "packed" else source


def ship_code(cfg: Config, rt: Runtime, out: Path) -> int:
    """Write the code file a record ships, train_gpt.py in the run folder (rank 0); returns its size on disk: the
    code bytes the run counts."""
    source = unpack_code(code_file().read_bytes())
    shipped, path = shipped_code(cfg, source), out / "train_gpt.py"
    if rt.main:
        write_whole(path, lambda p: p.write_bytes(shipped))
    code_bytes = path.stat().st_size if rt.main else len(shipped)  # rank 0 logs the size on disk
    rt.log(f"shipped_code:{path} bytes:{code_bytes} ({cfg.ship_code}; the source run is {len(source)} bytes)")
    return code_bytes


def calibration_batches(cfg: Config, rt: Runtime, base: GPT, make_loader) -> tuple[int, float]:
    """(GPTQ calibration micro-batches per rank, seconds to reserve for them). The batches: this rank's share of
    GPTQ_BATCHES, or fewer when a wallclock-capped run would not calibrate them within EXPORT_RESERVE_SECONDS (timed
    here, in warmup, on one batch after one that warms the eager path; the slowest rank decides, with a tenth kept for
    the all-reduce and the loader). The reserve: what those batches need, plus a second, at most EXPORT_RESERVE_SECONDS
    (on 8 GPUs 64 batches take ~3 s of the 12: the rest trains)."""
    per_rank = -(-cfg.gptq_batches // rt.world_size)
    if not cfg.gptq or cfg.max_wallclock_seconds == 0:
        return per_rank, cfg.export_reserve_seconds
    loader, plan = make_loader(), plan_for(cfg, cfg.repeats)
    batches = [loader.next_batch()[0] for _ in range(2)]
    collect_hessians(base, plan, batches[:1], rt.autocast)
    seconds = rt.agree_max(timed(rt, collect_hessians, base, plan, batches[1:], rt.autocast))
    fitting = max(1, int(0.9 * cfg.export_reserve_seconds / seconds))
    chosen = min(per_rank, fitting)
    reserve = min(cfg.export_reserve_seconds, chosen * seconds / 0.9 + 1.0)
    rt.log(
        f"gptq_calibration_plan batches_per_rank:{chosen} of {per_rank} batch_time:{seconds:.3f}s "
        f"reserve:{reserve:.1f}s of EXPORT_RESERVE_SECONDS={cfg.export_reserve_seconds:g}"
    )
    return chosen, reserve


def gptq_hessians(cfg: Config, rt: Runtime, base: GPT, per_rank: int) -> dict[str, torch.Tensor] | None:
    """GPTQ calibration, every rank on `per_rank` micro-batches of training data (never validation data) at full
    depth, averaged over ranks; timed against EXPORT_RESERVE_SECONDS."""
    if not cfg.gptq:
        return None
    start = time.perf_counter()
    loader = make_train_loader(cfg, rt)
    batches = (loader.next_batch()[0] for _ in range(per_rank))
    hessians = collect_hessians(base, plan_for(cfg, cfg.repeats), batches, rt.autocast)
    for key in sorted(hessians) if rt.distributed else ():
        dist.all_reduce(hessians[key])
        hessians[key] /= rt.world_size
    seconds, total = rt.clock() - start, per_rank * rt.world_size
    rt.log(
        f"gptq_calibration hessians:{len(hessians)} batches:{total} "
        f"tokens:{total * cfg.micro_batch_seqs * cfg.train_seq_len} "
        f"time:{seconds:.1f}s reserve:{cfg.export_reserve_seconds:.1f}s"
    )
    return hessians


def export_and_reload(
    base: GPT, cfg: Config, rt: Runtime, out: Path, code_bytes: int, calibration_per_rank: int
) -> tuple[int, Path]:
    """Calibrate GPTQ (all ranks), fit the artifact in TARGET_BYTES less the code's bytes and write it whole (rank 0),
    then load it back into `base` on every rank: (its bytes, its path). When nothing fits, every rank raises
    ArtifactTooLarge and nothing is written."""
    path = out / f"final_model.{artifact_name(cfg)}.ptz"
    hessians = gptq_hessians(cfg, rt, base, calibration_per_rank)
    failure = ""
    if rt.main:
        try:
            budget = cfg.target_bytes - code_bytes
            blob, _ = fit_artifact(base.state_dict(), hessians, export_recipe(cfg), budget, rt.log, model_meta(cfg))
            seconds = timed(rt, write_whole, path, lambda p: p.write_bytes(blob))
            rt.log(f"export_write {path.name} time:{seconds:.1f}s")
        except ArtifactTooLarge as exc:
            failure = str(exc)
    if rt.agree_max(float(bool(failure))):  # also the barrier: no rank goes on before rank 0 has written the file
        raise ArtifactTooLarge(failure or "rank 0 found no export under TARGET_BYTES")
    model_bytes = path.stat().st_size
    label = artifact_name(cfg).replace("_", "+")
    bits_per_param = 8 * model_bytes / sum(p.numel() for p in base.parameters())
    rt.log(f"Serialized model {label}: {model_bytes} bytes ({bits_per_param:.2f} bits per parameter)")
    rt.log(f"Code size: {code_bytes} bytes")
    total = model_bytes + code_bytes
    rt.log(f"Total submission size {label}: {total} bytes")
    if total > ARTIFACT_LIMIT_BYTES:
        rt.log(
            f"WARNING: artifact is {total} bytes, OVER the {ARTIFACT_LIMIT_BYTES} byte limit "
            f"by {total - ARTIFACT_LIMIT_BYTES} bytes: this run is not a valid submission"
        )
    base.load_state_dict(dequantize_state(unpack_artifact(path.read_bytes(), path)[0]), strict=True)
    return model_bytes, path


def final_evaluations(cfg: Config, rt: Runtime, evaluate_with) -> list[tuple[str, float, float, float]]:
    """The reloaded artifact's evaluations in evaluation_windows' order: (line name, loss, bpb, ms); the last scores."""
    results = []
    for kind, window, stride, adapter in evaluation_windows(cfg):
        start = rt.clock()
        mixer = NgramMixer(cfg, rt.device) if kind.endswith("_mix") else None
        val_loss, val_bpb = evaluate_with(window, stride, adapter, mixer=mixer)
        ms = 1000 * (rt.clock() - start)
        name = f"final_{artifact_name(cfg)}_{kind}"
        rt.log(f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{ms:.0f}ms")
        rt.log(f"{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
        if mixer is not None:
            rt.log(f"{name}_weights network,unigram,bigram,trigram:{mixer.log_w.softmax(0).tolist()}")
        results.append((name, val_loss, val_bpb, ms))
    return results


def compile_report() -> str:
    """Dynamo's counters: graph breaks (fullgraph=True turns any into an error) and graphs built."""
    from torch._dynamo.utils import counters

    return (
        f"compile_stats graph_breaks:{sum(counters['graph_break'].values())} "
        f"unique_graphs:{counters['stats']['unique_graphs']} recompiles:{sum(counters['recompiles'].values())} "
        f"fx_cache_hits:{counters['inductor'].get('fxgraph_cache_hit', 0)} "
        f"fx_cache_misses:{counters['inductor'].get('fxgraph_cache_miss', 0)}"
    )


def log_summary(rt: Runtime, results, code_bytes: int, model_bytes: int, artifact: Path, **extra) -> dict:
    """The final_summary line: the score is the last evaluation; bytes are the files on disk."""
    name, val_loss, val_bpb, eval_ms = results[-1]
    summary = dict(
        val_bpb=val_bpb,
        val_loss=val_loss,
        artifact=str(artifact) if artifact else None,
        score_line=f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_ms:.0f}ms",
        evals={n: dict(val_loss=l, val_bpb=b, eval_time_ms=round(ms)) for n, l, b, ms in results},
        bytes_code=code_bytes,
        bytes_model=model_bytes,
        bytes_total=code_bytes + model_bytes,
        **extra,
    )
    rt.log("final_summary " + json.dumps(summary, sort_keys=True))
    return summary


# ----------------------------------------------------------------------------------------------
# EVAL_ONLY
#
# Score an artifact that a run wrote, with the model settings it carries (scores reproduce its run's), or re-export a
# float checkpoint with this run's export settings (how exports of one trained model are compared).
# ----------------------------------------------------------------------------------------------


def config_for_artifact(cfg: Config, meta: dict, source: str) -> Config:
    """This run's settings with the artifact's model settings; another tokenizer's artifact is refused."""
    ours = model_meta(cfg)["tokenizer_sha256"]
    require(
        meta.get("tokenizer_sha256", ours) == ours,
        f"EVAL_ONLY={source}: written with another tokenizer than "
        f"TOKENIZER_PATH={cfg.tokenizer_path} (sha256 {meta.get('tokenizer_sha256', '')[:12]}...)",
        DataError,
    )
    settings = {**dataclasses.asdict(cfg), **(MODEL_KNOBS_ABSENT if "model" in meta else {}), **meta.get("model", {})}
    env = {
        name: str(int(v)) if isinstance(v, bool) else str(v)
        for name, field in env_knobs().items()
        if (v := settings[field.name]) != ""
    }
    env["PROG_DEPTH"] = ""  # training's schedule, not the model: evaluation runs the artifact's full depth
    return build_config(env, cfg.world_size)


def load_weights(model: GPT, state: dict, source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(
            f"EVAL_ONLY={source}: does not fit the configured model ({first}); "
            "set the same shape variables as the run that wrote it"
        ) from None


def read_eval_only(cfg: Config) -> dict | None:
    """EVAL_ONLY's file, read and checked (every refusal one line): a float checkpoint's EXPORT_WEIGHTS state dict, or
    None for an artifact, once its tokenizer and checksum are checked (eval_only unpacks it)."""
    source = Path(cfg.eval_only)
    if source.suffix != ".pt":
        blob = source.read_bytes()
        config_for_artifact(cfg, artifact_header(blob, f"EVAL_ONLY={source}")[0].get("meta", {}), str(source))
        unpack_artifact(blob, f"EVAL_ONLY={source}")
        return None
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors
        raise DataError(f"EVAL_ONLY={source}: not a float checkpoint of this script ({type(exc).__name__})") from None
    require(
        isinstance(saved, dict) and isinstance(saved.get("last"), dict),
        f"EVAL_ONLY={source}: holds a "
        f"{type(saved).__name__}, not a float checkpoint of this script (last, ema and swa weights)",
        DataError,
    )
    require(
        saved.get(cfg.export_weights) is not None,
        f"EVAL_ONLY={source}: holds no {cfg.export_weights} weights (EXPORT_WEIGHTS)",
    )
    return saved[cfg.export_weights]


def artifact_env(env: Mapping[str, str]) -> dict[str, str]:
    """EVAL_ONLY of a .ptz: the environment with the settings the artifact was written with (its model's, its widths,
    GPTQ and codec: they build its model and name its lines) and no PROG_DEPTH (a training schedule). A variable set
    to another value than the artifact's would be ignored: it is refused, every such variable named in one line,
    rather than a score under settings it does not have (or a refusal for a value the run would not even use)."""
    source = env.get("EVAL_ONLY", "")
    if Path(source).suffix == ".pt" or not Path(source).is_file():
        return dict(env)
    header, recipe, _ = artifact_header(Path(source).read_bytes(), f"EVAL_ONLY={source}")
    meta = header.get("meta", {})
    written = {
        **(MODEL_KNOBS_ABSENT if "model" in meta else {}),
        **meta.get("model", {}),
        "compressor": recipe.compressor,
        "gptq": any(getattr(recipe, g).gptq for g in GROUPS),
        **{f"quant_bits_{g}": getattr(recipe, g).bits for g in GROUPS},
    }
    settings, conflicts = {}, []
    for name, field in env_knobs().items():
        if field.name not in written:
            continue
        value = written[field.name]
        if name in env and parse_value(name, env[name], field.type, field.metadata["choices"]) != value:
            conflicts.append(f"{name}={env[name]} (the artifact's: {value})")
        settings[name] = str(int(value)) if isinstance(value, bool) else str(value)
    require(
        not conflicts,
        f"EVAL_ONLY={source}: {', '.join(conflicts)}: not what the artifact holds; unset "
        f"{'it' if len(conflicts) == 1 else 'them'} (the artifact's own settings are used)",
    )
    return {**env, **settings, "PROG_DEPTH": ""}


# Export settings that a written artifact cannot check (the fit may have coarsened its clip sigmas): EVAL_ONLY of a
# .ptz logs those set to other than the default as ignored.
EXPORT_ONLY_KNOBS = (
    "matrix_clip_sigmas",
    "embed_clip_sigmas",
    "target_bytes",
    "gptq_batches",
    "export_reserve_seconds",
    "export_weights",
)


def eval_only(cfg: Config, rt: Runtime, out: Path) -> dict:
    """Evaluate a written artifact as is, or re-export a float checkpoint with this run's export
    settings (how exports of one trained model are compared) and evaluate the result."""
    source = Path(cfg.eval_only)
    blob = None if source.suffix == ".pt" else source.read_bytes()
    if blob is not None:
        cfg = config_for_artifact(cfg, artifact_header(blob, f"EVAL_ONLY={source}")[0].get("meta", {}), str(source))
    val_tokens = load_val_tokens(cfg).to(rt.device)
    tables = val_byte_tables(cfg, rt, val_tokens)
    base = build_model(cfg, rt)[0]  # compiled as in a training run: its evaluations take as long
    if source.suffix == ".pt":
        load_weights(base, read_eval_only(cfg), cfg.eval_only)
        code_bytes = ship_code(cfg, rt, out)
        full_share = -(-cfg.gptq_batches // rt.world_size)  # no training clock here: every batch
        model_bytes, artifact = export_and_reload(base, cfg, rt, out, code_bytes, full_share)
    else:
        stored, recipe = unpack_artifact(blob, f"EVAL_ONLY={source}")
        load_weights(base, dequantize_state(stored), cfg.eval_only)
        code_bytes, model_bytes, artifact = ship_code(cfg, rt, out), source.stat().st_size, source
        rt.log(f"eval_only artifact:{source} bytes:{model_bytes} (code {code_bytes}) recipe:{recipe.describe()}")
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        ignored = [f"{k.upper()}={getattr(cfg, k)}" for k in EXPORT_ONLY_KNOBS if getattr(cfg, k) != defaults[k]]
        if ignored:
            rt.log(
                f"eval_only_ignored {' '.join(ignored)} (export settings: an artifact is scored as written; "
                "EVAL_ONLY of its run's final_model.float.pt re-exports)"
            )
    check_eval_budget(base, cfg, rt, document_bounds(val_tokens))
    results = final_evaluations(cfg, rt, evaluator(cfg, rt, base, val_tokens, tables))
    rt.log(compile_report())  # the budget check's priming and the evaluations'
    return log_summary(
        rt,
        results,
        code_bytes,
        model_bytes,
        artifact,
        eval_only=str(source),
        export_weights=cfg.export_weights if source.suffix == ".pt" else "as written",
    )


# ----------------------------------------------------------------------------------------------
# main(): inputs checked, ranks and run folder set up, then the run (or EVAL_ONLY); every error is one line
# ----------------------------------------------------------------------------------------------


def report(error: UserError, rank: int = 0, echo: bool = True) -> int:
    """Print the run's one `error:` line (naming the rank that found it, when not rank 0); return its exit code.
    Under torchrun the line also goes to the error file it gives each rank (`echo` off: the file only, for the ranks
    that leave the printing to rank 0), so its failure summary shows the line as the root cause, whichever rank it
    picks for it, instead of `error_file: <N/A>` and a link to its docs."""
    line = f"error: {f'[rank {rank}] ' if rank and echo else ''}{error}"  # the agreed error's line is rank 0's
    if echo:
        print(line, file=sys.stderr, flush=True)
    if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(OSError):  # the report itself never fails
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    return error.exit_code


def agree_on_inputs(rt: Runtime, failure: UserError | None) -> None:
    """Under torchrun every rank has checked its inputs (and its share of the shards) before the process group: here
    each learns what the others found, and the lowest failing rank's error stops all of them together, one line
    printed by rank 0 and one exit code. (A rank that failed alone used to exit first, and torchrun then killed
    rank 0 before it printed.)"""
    mine = (failure.exit_code, str(failure)) if failure else None
    found = [mine] * rt.world_size
    if rt.distributed:
        dist.all_gather_object(found, mine)
    failed = [(rank, finding) for rank, finding in enumerate(found) if finding]
    if failed:
        SIGNAL_STATE["stopping"] = True  # a signal now (torchrun's, as a peer exits) must not cut the line short
        rank, (code, message) = failed[0]
        error = UserError(f"[rank {rank}] {message}" if rank else message)
        error.exit_code = code
        raise error


def as_user_error(exc: Exception) -> UserError | None:
    """What main reports for an exception: a UserError as it is; a file that cannot be read or written as a DataError
    naming it; anything else once a stop signal came (a peer stopped at once, in mid-collective) as Interrupted."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.filename:
        return DataError(f"{exc.filename}: {exc.strerror}")
    if STOP_SIGNALS:
        return Interrupted(f"{STOP_SIGNALS[-1]} received: stopped at once ({type(exc).__name__} as a peer stopped)")
    return None


def main(phase: Callable[[Config, Runtime, Path | None], None] | None = None) -> int:
    env = dict(os.environ)
    watch_stop_signals()  # from the start: a signal during the checks ends in one line and exit code 5 too
    if not all(env.get(name, "0").isdecimal() for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return report(ConfigError("RANK, WORLD_SIZE and LOCAL_RANK: must be whole numbers (torchrun sets them)"))
    rank, world_size, failure = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), None
    try:
        cfg = build_config(artifact_env(env), world_size)
        out = resolve_out_dir(cfg)
        check_inputs(cfg, rank)
    except Exception as exc:
        if (failure := as_user_error(exc)) is None:
            raise
    if failure and not (world_size > 1 and "TORCHELASTIC_RUN_ID" in env):  # no launcher that started every rank
        return report(failure, rank)
    try:
        rt = setup_runtime()
    except UserError as exc:  # the peers did not join
        return report(failure or exc, rank)
    try:
        agree_on_inputs(rt, failure)
        if phase is None:  # a run; a tool's phase in its place (scripts/dry_run.py) has no folder and no log file
            out = open_run_folder(cfg, rt, out)
            log_header(cfg, rt)
        (phase or (eval_only if cfg.eval_only else run))(cfg, rt, out)
        if rt.distributed:  # no rank tears the group down while another still uses it
            dist.barrier()
    except Exception as exc:
        SIGNAL_STATE["stopping"] = True  # on its way out: torchrun's signal, once a peer has exited, must wait
        if (error := as_user_error(exc)) is None:
            raise
        # a data error may be one rank's alone, which prints it; the others are agreed, printed by rank 0
        report(error, rt.rank, echo=rt.main or isinstance(error, DataError))
        rt.log(f"error: {error}\nexit_code:{error.exit_code}", console=False)
        if isinstance(error, Refused) and rt.log_path and list(rt.log_path.parent.iterdir()) == [rt.log_path]:
            shutil.rmtree(rt.log_path.parent)  # a refused run leaves no folder behind: its log was all there was
        return error.exit_code
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: under torch 2.13, gloo's threads aborted finished runs now and then at exit.
    os._exit(code)
