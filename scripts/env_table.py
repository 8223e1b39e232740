"""Print the README's table of environment variables from train_gpt.Config (the source of truth).

Usage: python scripts/env_table.py > /tmp/table.md   (then paste it into README.md; a test checks
that every knob and its default appear there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_gpt import env_knobs  # noqa: E402


def render_default(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return '""' if value == "" else str(value)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print("| variable | default | meaning |")
    print("|---|---|---|")
    for name, field in env_knobs().items():
        print(f"| `{name}` | `{render_default(field.default)}` | {field.metadata['help']} |")


if __name__ == "__main__":
    main()
