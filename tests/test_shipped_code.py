"""Honest bytes: a run writes the code file a record ships (by default the packed, self-extracting copy of
train_gpt.py) beside its artifact and counts that file; the packed file runs as the readable one does."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, final_summary, run_script, tiny_env
from train_gpt import PACKED_HEADER, code_only, pack_code, unpack_code

READABLE = (ROOT / "train_gpt.py").read_bytes()


def test_packing_keeps_the_program_and_a_quarter_of_the_bytes():
    """The packed file holds the program (the same syntax tree) without comments and docstrings; packing what it
    holds gives the same file again."""
    import ast

    packed = pack_code(READABLE).encode()
    assert packed.startswith(PACKED_HEADER.encode()) and len(packed.splitlines()) == 2
    program = unpack_code(packed)
    assert ast.dump(ast.parse(program)) == ast.dump(ast.parse(code_only(READABLE))) and b"#" not in program.split(
        b"\n")[0]
    assert pack_code(program).encode() == packed and unpack_code(READABLE) == READABLE
    assert len(packed) < len(READABLE) / 3


@pytest.fixture
def readable_run(single_run):
    """conftest's tiny run of the readable train_gpt.py: (its run folder, its stdout)."""
    cwd, output = single_run
    return cwd / "runs" / "single", output


def score_lines(output: str) -> list[str]:
    """The exact score lines (no timing in them)."""
    return [line for line in output.splitlines() if re.match(r"final_\w+_exact val_loss:", line)]


def test_the_run_ships_the_packed_file_and_counts_it(readable_run):
    folder, output = readable_run
    shipped = folder / "train_gpt.py"
    summary = final_summary(output)
    assert shipped.read_bytes() == pack_code(READABLE).encode()
    assert summary["bytes_code"] == shipped.stat().st_size and f"Code size: {shipped.stat().st_size} bytes" in output
    assert f"train_gpt.py bytes:{shipped.stat().st_size} (packed; the source run is {len(READABLE)} bytes)" in output
    assert summary["bytes_total"] == summary["bytes_code"] + summary["bytes_model"]


def test_the_packed_file_scores_an_artifact_as_the_readable_one_and_ships_itself(readable_run, small_data, tmp_path):
    """EVAL_ONLY through the packed file prints the same score lines as through the readable one; it ships a copy of
    itself (packing its own unpacked source gives the same bytes) and counts that."""
    folder, _ = readable_run
    artifact = next(folder.glob("*.ptz"))
    env = tiny_env(small_data, EVAL_ONLY=artifact, EVAL_STRIDE=32)
    lines = {}
    for name, script in (("readable", ROOT / "train_gpt.py"), ("packed", folder / "train_gpt.py")):
        result = run_script({**env, "RUN_ID": name}, tmp_path, script=script, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        lines[name] = score_lines(result.stdout)
        shipped = tmp_path / "runs" / name / "train_gpt.py"
        assert shipped.read_bytes() == (folder / "train_gpt.py").read_bytes()
        assert final_summary(result.stdout)["bytes_code"] == shipped.stat().st_size
    assert lines["packed"] == lines["readable"] and len(lines["packed"]) == 2  # round trip and sliding


def test_ship_code_readable_ships_and_counts_the_readable_file(small_data, tmp_path):
    result = run_script(tiny_env(small_data, RUN_ID="plain", ITERATIONS=2, SHIP_CODE="readable", EVAL_STRIDE=0),
                        tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    shipped = tmp_path / "runs" / "plain" / "train_gpt.py"
    assert shipped.read_bytes() == READABLE and final_summary(result.stdout)["bytes_code"] == len(READABLE)
