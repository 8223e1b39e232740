"""The compiled path (each block and the loss head compiled) computes what eager computes."""
from __future__ import annotations

import torch

from conftest import PLAIN_SHAPE

from train_gpt import GPT, build_config, plan_for


def test_compiled_matches_eager_loss_and_gradients():
    torch.manual_seed(0)
    cfg = build_config({**PLAIN_SHAPE, "VOCAB_SIZE": "128", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                        "NUM_LAYERS": "4", "NUM_UNIQUE_LAYERS": "2", "XSA_LAST_N": "1", "TRAIN_SEQ_LEN": "16",
                        "TRAIN_BATCH_TOKENS": "64"})
    eager = GPT(cfg)
    for p in eager.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    compiled = GPT(cfg, compile=True)
    compiled.load_state_dict(eager.state_dict())
    plan = plan_for(cfg, cfg.repeats)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    loss_e, loss_c = eager(x, y, plan), compiled(x, y, plan)
    loss_e.backward()
    loss_c.backward()
    # float32 on CPU: fusion reorders arithmetic, so agreement is to rounding, not bitwise
    assert torch.allclose(loss_e, loss_c, rtol=1e-5, atol=1e-5)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(pe.grad, pc.grad, rtol=1e-4, atol=1e-6), name
    assert list(eager.state_dict()) == list(compiled.state_dict())  # export sees the same names
