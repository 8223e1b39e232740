"""Bad inputs as a user meets them end in one `error:` line naming the path or variable, a non-zero exit and nothing
lost, on one process and under torchrun, whichever rank finds them; no traceback, no hang."""
from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, clean_environ, run_script, tiny_env, trained_like, write_shard
from train_gpt import build_config, export_recipe, map_shard, model_meta, pack_artifact, quantize_state


def copy_data(tiny_data: Path, folder: Path) -> Path:
    folder.mkdir()
    for shard in tiny_data.iterdir():
        (folder / shard.name).write_bytes(shard.read_bytes())
    return folder


def bad_input(case: str, tiny_data: Path, tmp: Path) -> tuple[dict, str]:
    """A user's mistake: (the variables that make it, the start of the one line that must name it)."""
    data = tmp / "data"
    if case == "out_dir_under_a_file":  # as root, permission bits stop no write: a path under a regular file does
        (tmp / "file.txt").write_text("x")
        return dict(OUT_DIR=tmp / "file.txt" / "sub"), f"OUT_DIR: cannot make or write the run folder {tmp}/file.txt" \
            f"/sub: {tmp}/file.txt is not a folder"
    if case == "out_dir_a_file":
        (tmp / "file.txt").write_text("x")
        return dict(OUT_DIR=tmp / "file.txt"), f"OUT_DIR: output folder {tmp}/file.txt already exists as a file"
    if case == "folder_named_like_a_shard":
        copy_data(tiny_data, data)
        (data / "fineweb_train_000000.bin").unlink()
        (data / "fineweb_train_000000.bin").mkdir()
        return dict(DATA_PATH=data), f"{data}/fineweb_train_000000.bin: a folder, not a token shard"
    if case == "val_shard_cut_mid_token":
        copy_data(tiny_data, data)
        val = data / "fineweb_val_000000.bin"
        val.write_bytes(val.read_bytes()[:-1])
        return dict(DATA_PATH=data), f"{val}: size"
    if case == "tokenizer_a_folder":
        return dict(TOKENIZER_PATH=tmp), f"TOKENIZER_PATH={tmp}: a folder, not a SentencePiece .model file"
    if case in ("eval_only_a_bare_tensor", "eval_only_a_list", "eval_only_not_torch"):
        source = tmp / "weights.pt"
        if case == "eval_only_not_torch":
            source.write_bytes(b"not a checkpoint")
        else:
            torch.save(torch.zeros(3) if case == "eval_only_a_bare_tensor" else [torch.zeros(3)], source)
        kind = {"eval_only_a_bare_tensor": "holds a Tensor", "eval_only_a_list": "holds a list"}
        return dict(EVAL_ONLY=source), f"EVAL_ONLY={source}: {kind.get(case, 'not a float checkpoint')}"
    if case == "eval_only_a_folder":
        return dict(EVAL_ONLY=tmp), f"EVAL_ONLY={tmp}: a folder, not a file"
    if case == "resume_without_checkpoint":
        return dict(RESUME=tmp), f"RESUME={tmp}: no complete checkpoint there"
    if case == "resume_damaged_manifest":
        (tmp / "checkpoint").mkdir()
        (tmp / "checkpoint" / "checkpoint.json").write_text("{step: 3")
        return dict(RESUME=tmp), f"RESUME: {tmp}/checkpoint/checkpoint.json is not a JSON object"
    if case == "damaged_data_summary":
        copy_data(tiny_data, data)
        (data / "summary.json").write_text("[")
        return dict(DATA_PATH=data), f"DATA_PATH: {data}/summary.json is not a JSON object"
    if case == "launcher_variables_not_numbers":
        return dict(WORLD_SIZE="two"), "RANK, WORLD_SIZE and LOCAL_RANK: must be whole numbers"
    assert case == "several_ranks_without_master_addr"
    return dict(WORLD_SIZE=2, RANK=0), "WORLD_SIZE=2, RANK=0, MASTER_ADDR='', MASTER_PORT='': several processes need"


CASES = ["out_dir_under_a_file", "out_dir_a_file", "folder_named_like_a_shard", "val_shard_cut_mid_token",
         "tokenizer_a_folder", "eval_only_a_bare_tensor", "eval_only_a_list", "eval_only_not_torch",
         "eval_only_a_folder", "resume_without_checkpoint", "resume_damaged_manifest", "damaged_data_summary",
         "launcher_variables_not_numbers", "several_ranks_without_master_addr"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_naming_it(tiny_data, tmp_path, main_with, case):
    env, culprit = bad_input(case, tiny_data, tmp_path)
    code, lines = main_with(tiny_env(tiny_data, RUN_ID="bad", **env), tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {culprit}"), lines
    assert not (tmp_path / "runs").exists()  # refused before any run folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["out_dir_under_a_file", "eval_only_a_bare_tensor"])
def test_bad_input_reaches_the_shell_on_one_process_and_under_torchrun(tiny_data, tmp_path, case):
    """The same line from a plain run (exit 2) and from two ranks under torchrun, which both find it: one line
    from rank 0, no traceback of a worker, exit code 1 from torchrun with the workers' 2 in its report. Three tries:
    rank 0's line used to be lost most of the time, killed by torchrun when rank 1 exited first."""
    env, culprit = bad_input(case, tiny_data, tmp_path)
    env = tiny_env(tiny_data, RUN_ID="bad", **env)
    plain = run_script(env, tmp_path, timeout=120)
    assert plain.returncode == 2 and plain.stderr.splitlines() == [plain.stderr.strip()], plain.stderr[-2000:]
    assert plain.stderr.startswith(f"error: {culprit}")
    for _ in range(3):
        ranks = run_script(env, tmp_path, nproc=2, timeout=120)
        errors = [line for line in ranks.stderr.splitlines() if line.startswith("error:")]
        assert ranks.returncode == 1 and errors == [plain.stderr.strip()], ranks.stderr[-3000:]
        assert "exitcode  : 2" in ranks.stderr and "[rank" not in ranks.stderr.split("error:")[0]
        root_cause = ranks.stderr.split("Root Cause")[-1]  # torchrun's summary: the line, from whichever rank's file
        assert f"traceback : {plain.stderr.strip()}" in root_cause, root_cause


def spread_shards(tiny_data: Path, folder: Path, count: int, bad: int) -> Path:
    """`count` train shards cut from tiny_data's (and its val shard), shard `bad` with a token id beyond the
    vocabulary: check_inputs gives shard i to rank i % WORLD_SIZE, so only that rank reads it."""
    folder.mkdir()
    tokens = np.concatenate([map_shard(p) for p in sorted(tiny_data.glob("fineweb_train_*.bin"))])
    for i, part in enumerate(np.array_split(tokens, count)):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", np.where(np.arange(len(part)) == 7, 1500, part)
                    if i == bad else part)
    (folder / "fineweb_val_000000.bin").write_bytes((tiny_data / "fineweb_val_000000.bin").read_bytes())
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("nproc, bad", [(2, 1), (8, 5)])
def test_an_error_only_one_rank_finds_is_printed_once_naming_it(tiny_data, tmp_path, nproc, bad):
    """8 ranks: 8 processes on however few cores (about 25 s on 2 loaded ones)."""
    data = spread_shards(tiny_data, tmp_path / "data", nproc, bad)
    result = run_script(tiny_env(data, RUN_ID="bad", TRAIN_BATCH_TOKENS=64 * 8), tmp_path, nproc=nproc, timeout=240)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and errors == [f"error: [rank {bad}] {data}/fineweb_train_{bad:06d}.bin: token id "
                                                 "1500 >= VOCAB_SIZE=1024; the shards were built with another "
                                                 "tokenizer"], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr and not (tmp_path / "runs").exists()
    assert f"traceback : {errors[0]}" in result.stderr.split("Root Cause")[-1]


def test_the_error_line_goes_to_the_file_torchrun_names_and_a_bad_file_changes_nothing(tiny_data, tmp_path, main_with):
    """torchrun gives each worker TORCHELASTIC_ERROR_FILE and shows what its root-cause rank wrote there in its
    failure summary; torch's own reader gets the line back. A path that cannot be written leaves the run as it was."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    env, culprit = bad_input("out_dir_under_a_file", tiny_data, tmp_path)
    error_file = tmp_path / "error.json"
    code, lines = main_with(tiny_env(tiny_data, RUN_ID="bad", TORCHELASTIC_ERROR_FILE=error_file, **env), tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {culprit}"), lines
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file=str(error_file))
    assert failure.message == lines[0] and abs(failure.timestamp - time.time()) < 60
    for unwritable in (tmp_path, tmp_path / "no_such_folder" / "error.json"):
        again = main_with(tiny_env(tiny_data, RUN_ID="bad", TORCHELASTIC_ERROR_FILE=unwritable, **env), tmp_path)
        assert again == (code, lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something on this host listens on TCP `port` (from /proc: connecting would join the store)."""
    lines = [line.split() for table in ("tcp", "tcp6") for line in Path(f"/proc/net/{table}").read_text().splitlines()]
    return any(fields[1].endswith(f":{port:04X}") and fields[3] == "0A" for fields in lines if len(fields) > 3)


def launch_rank(env: dict, cwd: Path, rank: int, port: int, join_timeout: int = 0) -> subprocess.Popen:
    """One rank started without torchrun (as another launcher would, or variables left in a shell)."""
    patch = f"train_gpt.JOIN_TIMEOUT_S = {join_timeout}; " if join_timeout else ""
    code = f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import train_gpt; {patch}os._exit(train_gpt.main())"
    ranks = dict(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env={**clean_environ(), **env, **ranks}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("rank", [0, 1])
def test_world_size_left_in_a_plain_run_is_refused_once_peers_had_their_time(tiny_data, tmp_path, rank):
    """WORLD_SIZE=2 RANK=r and no peer: torch's env:// waited 30 minutes; now JOIN_TIMEOUT_S (120 s; 3 s here)
    and one line naming the variables (the store's C++ client logs each retry; none of it shows)."""
    proc = launch_rank(tiny_env(tiny_data, RUN_ID="alone"), tmp_path, rank, free_port(), join_timeout=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith(f"error: {f'[rank {rank}] ' if rank else ''}WORLD_SIZE=2, RANK={rank}, MASTER_ADDR="
                          "'127.0.0.1', MASTER_PORT=") and "the other ranks did not join within 3 s" in err


def test_ctrl_c_while_waiting_for_peers_stops_at_once(tiny_data, tmp_path):
    port = free_port()
    proc = launch_rank(tiny_env(tiny_data, RUN_ID="alone"), tmp_path, 0, port)  # waits 120 s
    deadline = time.monotonic() + 60
    while not listening(port) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 10 and proc.returncode == 5, err[-2000:]
    assert err.splitlines() == ["error: SIGINT received outside a training step: stopped; no partial file is left"]


@pytest.mark.slow
def test_ranks_started_without_torchrun_still_train_together(tiny_data, tmp_path):
    port, env = free_port(), tiny_env(tiny_data, RUN_ID="pair", ITERATIONS=6, EVAL_STRIDE=0)
    procs = [launch_rank(env, tmp_path, rank, port) for rank in (0, 1)]
    results = [(p.communicate(timeout=240), p.returncode) for p in procs]
    assert [code for _, code in results] == [0, 0], [err[-2000:] for (_, err), _ in results]
    assert "ranks_identical:True" in results[0][0][0] and "final_summary" in results[0][0][0]


def artifact(cfg_env: dict, path: Path) -> Path:
    cfg = build_config(cfg_env)
    recipe = export_recipe(cfg)
    path.write_bytes(pack_artifact(quantize_state(trained_like(cfg).state_dict(), recipe), recipe,
                                   meta=model_meta(cfg)))
    return path


@pytest.mark.parametrize("env, culprits", [
    # the old failure: MODEL_DIM=64 NUM_HEADS=8 has an 8-dim head, under the default ROPE_DIMS=16, which the
    # artifact does not use; the one line used to name ROPE_DIMS
    (dict(NUM_HEADS=8), "NUM_HEADS=8 (the artifact's: 2): not what the artifact holds; unset it"),
    (dict(MLP_ACT="relu2", NUM_LAYERS=3), "NUM_LAYERS=3 (the artifact's: 2), MLP_ACT=relu2 (the artifact's: "
                                          "leaky_relu2): not what the artifact holds; unset them"),
    (dict(QUANT_BITS_ATTN=6, COMPRESSOR="zstd"), "COMPRESSOR=zstd (the artifact's: brotli), QUANT_BITS_ATTN=6 "
                                                 "(the artifact's: 8)"),
])
def test_eval_only_names_the_set_variables_that_contradict_the_artifact(tiny_data, tmp_path, main_with, env,
                                                                         culprits):
    source = artifact(tiny_env(tiny_data), tmp_path / "a.ptz")
    shape = ("MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "NUM_LAYERS", "ROPE_DIMS")  # the artifact's: none set
    base = {k: v for k, v in tiny_env(tiny_data, EVAL_ONLY=source).items() if k not in shape}
    code, lines = main_with({**base, "MODEL_DIM": 64, **env}, tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: EVAL_ONLY={source}: {culprits}"), lines


def test_eval_only_logs_the_export_settings_it_ignores(tiny_data, tmp_path, main_with, capsys):
    source = artifact(tiny_env(tiny_data), tmp_path / "a.ptz")
    code, lines = main_with(tiny_env(tiny_data, EVAL_ONLY=source, RUN_ID="again", EVAL_STRIDE=0,
                                     MATRIX_CLIP_SIGMAS=3), tmp_path)
    log = (tmp_path / "runs" / "again" / "again.txt").read_text()
    assert code == 0 and not lines, lines
    assert "\neval_only_ignored MATRIX_CLIP_SIGMAS=3.0 EXPORT_WEIGHTS=last (export settings: an artifact " in log
    assert "\nfinal_int8_brotli_roundtrip_exact " in log  # named as the artifact was written


def limit_file_size():
    """A file size limit (as a full disk): writes past it fail with EFBIG instead of a SIGXFSZ kill."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))  # the log fits; the tiny model's checkpoint not


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_naming_it(tiny_data, tmp_path):
    env = {**clean_environ(), **tiny_env(tiny_data, RUN_ID="full", CHECKPOINT_EVERY=0.01)}
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=120, preexec_fn=limit_file_size)
    run = tmp_path / "runs" / "full"
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: runs/full/checkpoint/step1.rank0.pt: could not be written ([Errno 27] File too large)"], result.stderr
    assert list((run / "checkpoint").iterdir()) == []  # the part written is removed
    assert (run / "full.txt").read_text().endswith(f"{result.stderr.strip()}\nexit_code:2\n")
