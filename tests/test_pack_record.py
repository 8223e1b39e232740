"""Honest bytes: a record ships a compressed self-extracting train_gpt.py; its log counts that file."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, final_summary, run_script, tiny_env

PACK = [sys.executable, str(ROOT / "scripts" / "pack_record.py")]


def test_packed_script_trains_and_counts_its_own_size(tiny_data, tmp_path):
    wrapper = tmp_path / "record" / "train_gpt.py"
    subprocess.run(PACK + ["--out", str(wrapper)], check=True, capture_output=True, timeout=60)
    check = subprocess.run(PACK + ["--check", str(wrapper)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "byte-for-byte" in check.stdout
    assert wrapper.stat().st_size < (ROOT / "train_gpt.py").stat().st_size / 2
    result = run_script(tiny_env(tiny_data, RUN_ID="packed", ITERATIONS=4), tmp_path, script=wrapper, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = final_summary(result.stdout)
    assert summary["bytes_code"] == wrapper.stat().st_size
    assert f"Code size: {wrapper.stat().st_size} bytes" in result.stdout
    assert summary["bytes_total"] == summary["bytes_code"] + summary["bytes_model"]


def test_check_rejects_a_wrapper_of_other_source_and_refuses_to_overwrite(tmp_path):
    other = tmp_path / "other.py"
    other.write_text("print('not the training script')\n")
    wrapper = tmp_path / "train_gpt.py"
    subprocess.run(PACK + ["--source", str(other), "--out", str(wrapper)], check=True, capture_output=True, timeout=60)
    check = subprocess.run(PACK + ["--check", str(wrapper)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "DIFFERS" in check.stdout
    before = wrapper.read_bytes()
    again = subprocess.run(PACK + ["--out", str(wrapper)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already exists" in again.stderr and wrapper.read_bytes() == before


def test_a_failed_write_leaves_no_wrapper_and_no_partial_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "record" / "train_gpt.py"
    real_write = Path.write_text

    def disk_full(path, text, *args, **kwargs):  # half the wrapper reaches the disk, then the write fails
        real_write(path, text[:len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    monkeypatch.setattr(sys, "argv", ["pack_record.py", "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "scripts" / "pack_record.py"), run_name="__main__")
    assert f"error: --out {out}: No space left on device" == stop.value.code
    assert list(out.parent.iterdir()) == []  # neither the wrapper nor its partial file: a rerun can write it
