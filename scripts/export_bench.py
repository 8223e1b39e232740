"""Bytes and seconds of the export (quantize -> serialize -> shuffle -> compress) on Gaussian weights.

Usage:
    python scripts/export_bench.py                      # the 2026-04-09 record's shape, 35.9M parameters
    python scripts/export_bench.py --codecs zstd --streams 1,16 --env QUANT_BITS_MLP=5

Builds train_gpt's model for the shape, replaces every float tensor with Gaussian noise (std-based
steps make the bytes independent of its scale), exports it by rounding (no GPTQ) with the run's
recipe for each codec x stream count, and prints one markdown row per export.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt  # noqa: E402

RECORD_SHAPE = ["NUM_LAYERS=11", "MODEL_DIM=512", "MLP_MULT=4", "NUM_HEADS=8", "NUM_KV_HEADS=4", "VOCAB_SIZE=8192"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", nargs="*", default=[], help="extra knobs NAME=VALUE (after the record's shape)")
    parser.add_argument("--codecs", default="brotli,zstd,lzma", help="comma-separated codecs")
    parser.add_argument("--streams", default="1,16", help="comma-separated stream counts")
    args = parser.parse_args()
    try:
        env = dict(item.split("=", 1) for item in RECORD_SHAPE + args.env)
        cfg = train_gpt.build_config(env)
    except (ValueError, train_gpt.ConfigError) as exc:
        sys.exit(f"error: --env: {exc}")
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    print(f"parameters: {sum(v.numel() for v in state.values()):,}; knobs: {' '.join(RECORD_SHAPE + args.env)}",
          flush=True)
    print("| codec | streams | bytes | quantize s | serialize s | compress s (wall) | pack s (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for codec in args.codecs.split(","):
        for streams in map(int, args.streams.split(",")):
            recipe = dataclasses.replace(train_gpt.export_recipe(cfg), compressor=codec, streams=streams)
            start = time.perf_counter()
            stored = train_gpt.quantize_state(state, recipe)
            quantize_s, times, cpu = time.perf_counter() - start, {}, time.process_time()
            blob = train_gpt.pack_artifact(stored, recipe, times)
            print(f"| {codec} | {streams} | {len(blob):,} | {quantize_s:.1f} | "
                  f"{times['serialize']:.1f} | {times['compress']:.1f} | {time.process_time() - cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
