"""STYLE.md's size rule for train_gpt.py, as tests: code tokens (not lines), tokens per code line, function and line
length, the packed file's size, the formatter's layout, and a clean import."""
from __future__ import annotations

import ast
import io
import shutil
import subprocess
import sys
import tokenize

import pytest

from conftest import ROOT
from train_gpt import pack_code

SOURCE = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
MAX_CODE_TOKENS = 30_000
MAX_TOKENS_PER_CODE_LINE = 11.5
MAX_PACKED_BYTES = 64_000
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
            tokenize.ENCODING}


def docstring_starts(source: str) -> set[tuple[int, int]]:
    """Where each module, class and function docstring starts (line, column)."""
    starts = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                     str):
                starts.add((first.lineno, first.col_offset))
    return starts


def code_tokens(source: str) -> tuple[int, int]:
    """(code tokens, code lines): Python tokens other than comments, docstrings, line breaks and indentation, and the
    lines that hold at least one. An f-string is one token, as Python 3.11 tokenizes it (3.12 splits it)."""
    docstrings, count, lines, depth = docstring_starts(source), 0, set(), 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[token.type]
        if name in ("FSTRING_MIDDLE", "FSTRING_END") or (depth and name != "FSTRING_START"):
            depth -= name == "FSTRING_END"
            continue
        depth += name == "FSTRING_START"
        if token.type in NOT_CODE or (token.type == tokenize.STRING and token.start in docstrings):
            continue
        count += 1
        lines.add(token.start[0])
    return count, len(lines)


def test_code_tokens_and_their_density_are_within_the_size_rule():
    count, lines = code_tokens(SOURCE)
    assert count <= MAX_CODE_TOKENS, f"{count} code tokens: remove a knob no default needs, or simplify; never golf"
    assert count / lines <= MAX_TOKENS_PER_CODE_LINE, f"{count / lines:.2f} code tokens per code line: unpack lines"


def test_the_counter_skips_comments_docstrings_and_layout():
    source = 'def f(x):\n    """Doc."""\n    # note\n\n    return f"{x}!" + "s"  # why\n'
    assert code_tokens(source) == (10, 2)  # def f ( x ) : / return f"..." + "s"


def test_no_function_over_80_lines():
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(SOURCE))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def test_no_line_over_120_characters():
    long = [i for i, line in enumerate(SOURCE.splitlines(), 1) if len(line) > 120]
    assert not long, f"lines {long}"


def test_the_packed_file_a_record_ships_stays_small():
    assert len(pack_code(SOURCE.encode()).encode()) <= MAX_PACKED_BYTES


def test_the_file_keeps_the_formatters_layout():
    """`ruff format` (ruff.toml) lays the file out: nobody packs lines by hand to save room."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (.ci/run installs it)")
    result = subprocess.run([ruff, "format", "--check", "--diff", str(ROOT / "train_gpt.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_import_reads_no_environment_and_touches_no_device():
    """Importing the file runs nothing: a malformed knob in the environment is not even read."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import torch, train_gpt; "
            "import torch.distributed as d; "
            "assert not torch.cuda.is_initialized() and not d.is_initialized(); print('clean')")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120,
                            env={"NUM_LAYERS": "not-a-number", "PATH": "/usr/bin:/bin", "TRAIN_BATCH_TOKNS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr[-2000:]
