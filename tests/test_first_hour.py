"""What a new user meets first on a machine without a GPU: a warning before hours of CPU training,
and an evaluation-budget refusal that names the part that does not fit."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import train_gpt
from conftest import PLAIN_SHAPE
from train_gpt import GPT, Runtime, UserError, build_config, build_model, check_eval_budget

CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = dict(PLAIN_SHAPE, VOCAB_SIZE="1024", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", NUM_LAYERS="2", TRAIN_SEQ_LEN="64",
            TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="4096")


def test_the_default_model_on_the_cpu_warns_once(capsys):
    build_model(build_config({}), CPU)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING: running on the CPU with 35,944,615 parameters: expect hours; "
                        "see data/README.md for a tiny CPU recipe"]
    build_model(build_config(TINY), CPU)
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("env, hint", [
    (dict(TTT_LR="0.01", TTT_EPOCHS="3", EVAL_STRIDE="0", TTT_CHUNK="1024"), "TTT is "),  # 7 steps of 3 epochs
    (dict(TTT_LR="0", EVAL_STRIDE="8"), "raise EVAL_STRIDE"),
])
def test_eval_budget_refusal_names_what_dominates(env, hint):
    cfg = build_config({**TINY, **env, "EVAL_BUDGET_S": "1e-9"})
    with pytest.raises(UserError, match=hint) as refused:
        check_eval_budget(GPT(cfg, torch.float32), cfg, CPU, [(0, 8191)])  # one document, 8192 tokens
    message = str(refused.value)
    assert message.startswith("EVAL_BUDGET_S=1e-09: the final evaluations would take about")
    assert ("TTT_EPOCHS" in message) == (env["TTT_LR"] != "0")


# The kernel each combination gets (COMPILE, DOC_MASK, ATTN_BACKEND, device, flash_attn_interface importable):
# FA3 only where a compiled CUDA run may use it; flex_attention for documents on compiled CUDA without it; else SDPA.
NOT_SDPA = {
    (1, 0, "auto", "cuda", True): "fa3",
    (1, 1, "auto", "cuda", True): "fa3_varlen",
    (1, 1, "auto", "cuda", False): "flex_attention",
    (1, 1, "sdpa", "cuda", True): "flex_attention",
    (1, 1, "sdpa", "cuda", False): "flex_attention",
}
COMBINATIONS = [(c, d, b, device, fa3) for c in (0, 1) for d in (0, 1) for b in ("auto", "sdpa")
                for device in ("cpu", "cuda") for fa3 in (True, False)]


@pytest.mark.parametrize("compile_, doc_mask, backend, device, fa3", COMBINATIONS)
def test_attention_backend_is_named_by_a_function_the_model_can_extend(monkeypatch, compile_, doc_mask, backend,
                                                                       device, fa3):
    """Every combination against the table above (32 of them): the name the log header prints, and from which
    build_model decides whether the blocks get FA3 (a name starting with fa3)."""
    # an importable stand-in, or None in sys.modules: `import` then raises ImportError, as when FA3 is not installed
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace() if fa3 else None)
    cfg = build_config(dict(TINY, COMPILE=str(compile_), DOC_MASK=str(doc_mask), ATTN_BACKEND=backend))
    expected = NOT_SDPA.get((compile_, doc_mask, backend, device, fa3), "sdpa")
    assert train_gpt.attention_backend_name(cfg, device) == expected
