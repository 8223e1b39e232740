"""STYLE.md's rules for train_gpt.py, as tests: line budget, function and line length, a clean import."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import ROOT

SOURCE = (ROOT / "train_gpt.py").read_text(encoding="utf-8")


def test_line_budget_is_stated_and_kept():
    budget = int(re.search(r"Line budget: ([\d,]+) lines", SOURCE)[1].replace(",", ""))
    assert budget == 2700 and len(SOURCE.splitlines()) <= budget


def test_no_function_over_80_lines():
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(SOURCE))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def test_no_line_over_120_characters():
    long = [i for i, line in enumerate(SOURCE.splitlines(), 1) if len(line) > 120]
    assert not long, f"lines {long}"


def test_import_reads_no_environment_and_touches_no_device():
    """Importing the file runs nothing: a malformed knob in the environment is not even read."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import torch, train_gpt; "
            "import torch.distributed as d; "
            "assert not torch.cuda.is_initialized() and not d.is_initialized(); print('clean')")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120,
                            env={"NUM_LAYERS": "not-a-number", "PATH": "/usr/bin:/bin", "TRAIN_BATCH_TOKNS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr[-2000:]
