"""scripts/profile_step.py's kernel accounting and random batches (the script itself needs a GPU)."""
from __future__ import annotations

import subprocess
import sys

import torch
from conftest import ROOT

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


def test_a_doc_tokens_below_one_is_refused_in_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--doc-tokens", "0.5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        "error: --doc-tokens 0.5: give 0 (no BOS) or a mean document length of at least 1"
    ]
