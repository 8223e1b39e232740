"""scripts/dry_run.py: a run's checks and estimates outside the shipped file, with the shipped file's bytes counted."""
from __future__ import annotations

import sys

from conftest import ROOT, run_script, tiny_env
from test_model import tiny_cfg

sys.path.insert(0, str(ROOT / "scripts"))
import dry_run  # noqa: E402
import train_gpt  # noqa: E402

SCRIPT = ROOT / "scripts" / "dry_run.py"


def test_the_estimate_counts_the_code_train_gpt_ships_not_the_dry_run_script(monkeypatch):
    monkeypatch.setattr(train_gpt, "pack_artifact", lambda stored, recipe: b"\0" * 7)
    source = (ROOT / "train_gpt.py").read_bytes()
    for ship, code in (("packed", train_gpt.pack_code(source).encode()), ("readable", source)):
        cfg = tiny_cfg(SHIP_CODE=ship)
        code_bytes = dry_run.shipped_code_bytes(cfg)
        assert code_bytes == len(code) != len(train_gpt.shipped_code(cfg, SCRIPT.read_bytes())), ship
        state = dry_run.gaussian_state(train_gpt.GPT(cfg))
        assert dry_run.estimated_artifact_bytes(cfg, state, code_bytes) == len(code) + 7
    assert len(train_gpt.pack_code(source)) < len(source) // 2  # the packed file is what the default counts


def test_bad_input_exits_2_in_one_line_naming_it_before_any_work(tmp_path, tiny_data):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "taken.txt").write_text("a run's log")
    for env, culprit in ((dict(RUN_ID="taken"), "RUN_ID: output folder runs/taken already exists"),
                         (dict(NUM_HEADS=3), "NUM_HEADS"), (dict(DATA_PATH=tmp_path / "none"), "none")):
        result = run_script(tiny_env(tiny_data, **env), tmp_path, timeout=60, script=SCRIPT)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith("error: ") and culprit in result.stderr and "dry_run" not in result.stdout
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["taken"]  # nothing written
