"""Write a self-extracting, compressed train_gpt.py: the file a record ships and its log counts.

Usage:
    python scripts/pack_record.py --out records/track_10min_16mb/2026-11-22_Name/train_gpt.py
    python scripts/pack_record.py --check records/.../train_gpt.py     # decodes to train_gpt.py?

The wrapper is two lines: it decompresses the readable source (xz, base85) and executes it as
the main module, so the run behaves exactly like the readable file, and the logged `Code size`
is the wrapper's own size on disk (what the artifact counts). The readable source is never
edited by hand; `--check` proves the wrapper decodes to it byte for byte.
"""
from __future__ import annotations

import argparse
import base64
import lzma
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_gpt import pack_code  # noqa: E402  (the wrapper's format lives with the code that logs its size)


def unpack(wrapper: str) -> bytes:
    match = re.search(r'b85decode\("([^"]+)"\)', wrapper)
    if not match:
        raise ValueError("not a packed train_gpt.py (no payload found)")
    return lzma.decompress(base64.b85decode(match[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "train_gpt.py", help="readable script to pack")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="where to write the wrapper (refuses to overwrite)")
    group.add_argument("--check", type=Path, help="a wrapper to verify against --source")
    args = parser.parse_args()
    if not args.source.is_file():
        sys.exit(f"error: --source {args.source}: file not found")
    source = args.source.read_bytes()
    if args.check:
        if not args.check.is_file():
            sys.exit(f"error: --check {args.check}: file not found")
        try:
            same = unpack(args.check.read_text(encoding="utf-8")) == source
        except (ValueError, lzma.LZMAError) as exc:
            sys.exit(f"error: --check {args.check}: {exc}")
        print(f"{args.check}: {'decodes byte-for-byte to' if same else 'DIFFERS from'} {args.source}")
        sys.exit(0 if same else 1)
    if args.out.exists():
        sys.exit(f"error: --out {args.out}: already exists; remove it first")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = pack_code(source)
    partial = args.out.with_name(args.out.name + ".partial")  # renamed when whole: a failed write leaves no --out
    try:
        partial.write_text(wrapper, encoding="utf-8")
        partial.replace(args.out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        sys.exit(f"error: --out {args.out}: {exc.strerror or exc}")
    print(f"wrote {args.out}: {len(wrapper.encode())} bytes (readable source {len(source)} bytes)")


if __name__ == "__main__":
    main()
