"""scripts/profile_step.py's kernel accounting and random batches, and the script on the CPU as one process and as
two torchrun ranks (its timings and profiler need a GPU; the CPU checks that it runs and splits the batch)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, clean_environ

sys.path.insert(0, str(ROOT / "scripts"))
import profile_step  # noqa: E402


def test_beyond_the_top_sums_what_the_list_leaves_out_by_part():
    kernels = [  # (ms a step, part, name, launches a step), costliest first, as kernel_breakdown returns them
        (50.0, "attention", "flash_bwd", 17),
        (20.0, "matmul", "nvjet_a", 34),
        (3.0, "norms/elementwise", "triton_poi_fused_add_1", 102),
        (2.5, "matmul", "nvjet_b", 17),
        (1.5, "norms/elementwise", "triton_per_fused_rms_2", 51),
    ]
    lines = profile_step.beyond_the_top(kernels, 2, kernel_ms=77.0)
    assert lines == [
        "  the other 3 kernels: 7.0 ms (9.1%), 170 launches a step, the costliest 3.00 ms",
        "    norms/elementwise:     4.5 ms in 2 kernels, 153 launches",
        "               matmul:     2.5 ms in 1 kernels, 17 launches",
    ]
    assert profile_step.beyond_the_top(kernels, 0, 77.0) == [] and profile_step.beyond_the_top(kernels, 5, 77.0) == []


def test_random_batch_holds_no_bos_unless_documents_are_asked_for():
    cfg = profile_step.tg.build_config({"VOCAB_SIZE": "64", "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "16384"})
    gen = torch.Generator().manual_seed(0)
    x, y = profile_step.random_batch(cfg, 0, "cpu", gen)
    assert x.shape == y.shape == (cfg.micro_batch_seqs, 256)
    assert (x != profile_step.tg.BOS_ID).all() and x.min() >= 0 and x.max() < 64 and y.max() < 64
    x, _ = profile_step.random_batch(cfg, 32, "cpu", gen)  # a BOS in 1 of 32 places
    rate = (x == profile_step.tg.BOS_ID).float().mean().item()
    assert abs(rate - 1 / 32) < 0.005, rate


@pytest.mark.parametrize("argument, line", [
    ("--doc-tokens=0.5", "error: --doc-tokens 0.5: give 0 (no BOS) or a mean document length of at least 1"),
    ("--passes=1,x", "error: --passes 1,x: give core pass counts separated by commas, e.g. 1,3"),
    ("--passes=0,3", "error: --passes 0,3: each from 1 to 3, the core passes of this shape"),
    ("--passes=4", "error: --passes 4: each from 1 to 3, the core passes of this shape"),
    ("--steps=0", "error: --steps 0: give at least 1 timed step"),
    ("--peak-tflops=-5", "error: --peak-tflops -5: give the card's rate, above 0"),
    ("--top=-1", "error: --top -1: give 0 (no list) or the number of kernels to list"),
])
def test_a_bad_argument_is_refused_in_one_line(argument, line):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), argument],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [line]


def test_under_torchrun_a_bad_setting_is_one_line_and_torchruns_summary_names_it():
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run([*launch, str(ROOT / "scripts" / "profile_step.py")], capture_output=True, text=True,
                         timeout=120, env={**clean_environ(), "NUM_LAYERS": "2"})
    line = "error: NUM_LAYERS=2: with NUM_UNIQUE_LAYERS=11 and core 3..5 it must be 11, 14, 17, 20, ..."
    assert run.returncode != 0
    assert [x for x in run.stderr.splitlines() if x.startswith("error:")] == [line]  # rank 0 alone prints it
    assert f"traceback : {line}" in run.stderr  # the root cause torchrun reports, not a link to its docs


TINY = {"VOCAB_SIZE": "1024", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "NUM_UNIQUE_LAYERS": "3",
        "LOOP_START": "1", "LOOP_END": "1", "NUM_LAYERS": "5", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "2048",
        "MICRO_BATCH_TOKENS": "512"}


def test_under_torchrun_the_ranks_split_the_batch_and_the_gradient_all_reduce_is_timed_on_rank_0_alone():
    script, runs = str(ROOT / "scripts" / "profile_step.py"), {}
    for ranks in (1, 2):
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] * (ranks > 1))
        runs[ranks] = subprocess.run([*launch, script, "--steps", "1"], capture_output=True, text=True, timeout=240,
                                     env={**clean_environ(), **TINY})
        assert runs[ranks].returncode == 0, runs[ranks].stderr[-2000:]
    one, two = runs[1].stdout, runs[2].stdout
    # 2,048 tokens a step: 32 rows of 64; micro-batches of 8 rows: 4 micro-steps on one rank, 2 on each of two
    assert one.count("shape:") == 1 and "ranks=1 micro_steps=4" in one
    assert two.count("shape:") == 1 and "ranks=2 micro_steps=2" in two  # rank 1 prints nothing
    assert two.count("== ") == one.count("== ") == 2  # 1 and 3 core passes
    assert "gradient all-reduce" not in one and two.count("gradient all-reduce: step ") == 2
    assert two.count("M over 2 ranks)") == 2 and "over 1 ranks" not in one
