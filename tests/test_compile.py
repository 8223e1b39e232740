"""The compiled path (each block and the loss head compiled) computes what eager computes."""
from __future__ import annotations

import copy

import torch

from conftest import PLAIN_SHAPE

import pytest

from train_gpt import GPT, build_config, enable_qat, plan_for, set_qat


@pytest.mark.parametrize("qat", [False, True])
def test_compiled_matches_eager_loss_and_gradients(qat):
    torch.manual_seed(0)
    cfg = build_config({**PLAIN_SHAPE, "VOCAB_SIZE": "128", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                        "NUM_LAYERS": "4", "NUM_UNIQUE_LAYERS": "2", "XSA_LAST_N": "1", "TRAIN_SEQ_LEN": "16",
                        "TRAIN_BATCH_TOKENS": "64", "QAT_START": "0.5" if qat else "0", "QUANT_BITS_MLP": "6"})
    eager = GPT(cfg)
    for p in eager.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    if qat:
        enable_qat(eager, cfg)
        set_qat(eager, True)
    compiled = GPT(cfg, compile=True)
    compiled.load_state_dict(eager.state_dict())
    if qat:
        enable_qat(compiled, cfg)
        set_qat(compiled, True)
    plan = plan_for(cfg, cfg.repeats)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    loss_e, loss_c = eager(x, y, plan), compiled(x, y, plan)
    loss_e.backward()
    loss_c.backward()
    # float32 on CPU: fusion reorders arithmetic, so agreement is to rounding, not bitwise; with QAT
    # an ulp can move a weight across a rounding boundary (one code step), hence the looser bound
    tol = dict(rtol=1e-3, atol=1e-3) if qat else dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(loss_e, loss_c, **tol)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        if qat:  # a flipped code moves nearby gradients a little: compare whole tensors
            assert (pe.grad - pc.grad).norm() <= 0.05 * pe.grad.norm() + 1e-8, name
        else:
            assert torch.allclose(pe.grad, pc.grad, rtol=1e-4, atol=1e-6), name
    assert list(eager.state_dict()) == list(compiled.state_dict())  # export sees the same names
