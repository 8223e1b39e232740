"""Refusals with one line, and runs that stop cleanly: bad names and numbers, bad shards, divergence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_env, write_shard
from train_gpt import ConfigError, DataError, Runtime, build_config, open_run_folder, read_shard_header


@pytest.mark.parametrize("env, culprit", [
    ({"RUN_ID": "../escape"}, "RUN_ID"), ({"RUN_ID": "a/b"}, "RUN_ID"), ({"RUN_ID": ".."}, "RUN_ID"),
    ({"BETA2": "1"}, "BETA2"), ({"ADAM_EPS": "0"}, "ADAM_EPS"), ({"SEED": str(2**40)}, "SEED"),
    ({"SEED": "-1"}, "SEED"), ({"XSA_LAST_N": "-2"}, "XSA_LAST_N"), ({"ROPE_DIMS": "7"}, "ROPE_DIMS"),
])
def test_values_the_code_cannot_run_are_refused(env, culprit):
    with pytest.raises(ConfigError, match=culprit):
        build_config(env)


def test_empty_shard_is_refused(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, [])
    with pytest.raises(DataError, match="empty shard"):
        read_shard_header(path)


def test_second_run_with_the_same_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"RUN_ID": "twin"})
    first = Runtime(0, 1, 0, torch.device("cpu"))
    open_run_folder(cfg, first, tmp_path / "runs" / "twin")
    with pytest.raises(ConfigError, match="^RUN_ID=twin: another run is already writing"):
        open_run_folder(cfg, Runtime(0, 1, 0, torch.device("cpu")), tmp_path / "runs" / "twin")
    assert first.log_path.exists()


def copy_with(tiny_data, folder, name, tokens):
    folder.mkdir()
    for p in tiny_data.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    write_shard(folder / name, tokens)
    return folder


@pytest.mark.parametrize("name", ["fineweb_train_000001.bin", "fineweb_val_000000.bin"])
def test_token_ids_beyond_the_vocabulary_stop_with_one_line(tiny_data, tmp_path, name, main_with):
    data = copy_with(tiny_data, tmp_path / "data", name, np.full(5000, 1500))  # VOCAB_SIZE is 1024
    code, lines = main_with(tiny_env(data, RUN_ID="big", ITERATIONS=60), tmp_path)
    assert code == 2 and len(lines) == 1 and f"{data / name}: token id 1500 >= VOCAB_SIZE=1024" in lines[0], lines
    assert not (tmp_path / "runs").exists()  # each shard's ids are read when the inputs are checked: no run folder


def test_divergence_stops_training_without_an_export(small_data, tmp_path, main_with):
    code, lines = main_with(tiny_env(small_data, RUN_ID="nan", TIED_EMBED_LR="1e30", MATRIX_LR="1e30",
                                     SCALAR_LR="1e30"), tmp_path)
    assert code == 4 and len(lines) == 1 and "not finite" in lines[0], lines
    assert not list((tmp_path / "runs" / "nan").glob("*.ptz"))
    assert "error: the training loss is not finite" in (tmp_path / "runs" / "nan" / "nan.txt").read_text()


def test_sigterm_during_training_stops_on_a_step_with_one_line(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT, clean_environ

    env = {**clean_environ(), **tiny_env(tiny_data, RUN_ID="sig", ITERATIONS=100000, TRAIN_LOG_EVERY=1)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("step:3/"):  # training is under way
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SIGTERM received: training stopped after step "), lines
    assert "Traceback" not in err and not list((tmp_path / "runs" / "sig").glob("*.ptz"))
    assert os.path.exists(tmp_path / "runs" / "sig" / "sig.txt")


def test_an_artifact_for_another_tokenizer_is_refused_and_its_model_settings_are_used(tiny_data):
    from conftest import tiny_env
    from train_gpt import config_for_artifact, model_meta

    cfg = build_config(tiny_env(tiny_data))
    meta = model_meta(cfg)
    assert meta["model"]["model_dim"] == 64 and len(meta["tokenizer_sha256"]) == 64
    other = build_config(tiny_env(tiny_data, MODEL_DIM=32, NUM_LAYERS=4, MLP_MULT=3))
    assert config_for_artifact(other, meta, "a.ptz") == cfg  # every model setting back from the artifact
    with pytest.raises(DataError, match="EVAL_ONLY=a.ptz: written with another tokenizer"):
        config_for_artifact(cfg, {**meta, "tokenizer_sha256": "0" * 64}, "a.ptz")


def test_a_data_folder_built_with_another_tokenizer_is_refused(tiny_data, tmp_path):
    """data/build_shards.py records the tokenizer's sha256 in summary.json; a folder without one is not checked."""
    import hashlib
    import json
    import shutil

    from conftest import tokenizer_path
    from train_gpt import check_inputs

    data = shutil.copytree(tiny_data, tmp_path / "data")
    cfg = build_config(tiny_env(data))
    (data / "summary.json").write_text(json.dumps({"tokenizer": {"path": "other.model", "sha256": "0" * 64}}))
    with pytest.raises(ConfigError, match=f"^TOKENIZER_PATH={tokenizer_path(1024)}: not the tokenizer of DATA_PATH="
                                          f"{data}, other.model$"):
        check_inputs(cfg)
    ours = hashlib.sha256(tokenizer_path(1024).read_bytes()).hexdigest()
    (data / "summary.json").write_text(json.dumps({"tokenizer": {"path": "mine.model", "sha256": ours}}))
    check_inputs(cfg)
