"""The compiled path (each block and the loss head compiled) computes what eager computes; with DOC_MASK=1 its
attention is flex_attention under a compiled block mask (the GPU's path without FA3), eager's a boolean SDPA mask."""
from __future__ import annotations

import torch

from conftest import PLAIN_SHAPE

from train_gpt import BOS_ID, GPT, Blocks, build_config, plan_for


def twins(**env) -> tuple[GPT, GPT]:
    """An eager model with non-trivial weights and a compiled one with the same weights."""
    torch.manual_seed(0)
    cfg = build_config({**PLAIN_SHAPE, "VOCAB_SIZE": "128", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                        "NUM_LAYERS": "4", "NUM_UNIQUE_LAYERS": "2", "XSA_LAST_N": "1", "TRAIN_SEQ_LEN": "16",
                        "TRAIN_BATCH_TOKENS": "64", **env})
    eager = GPT(cfg)
    for p in eager.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    compiled = GPT(cfg, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def test_compiled_matches_eager_loss_and_gradients():
    eager, compiled = twins()
    plan = plan_for(eager.cfg, eager.cfg.repeats)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    loss_e, loss_c = eager(x, y, plan), compiled(x, y, plan)
    loss_e.backward()
    loss_c.backward()
    # float32 on CPU: fusion reorders arithmetic, so agreement is to rounding, not bitwise
    assert torch.allclose(loss_e, loss_c, rtol=1e-5, atol=1e-5)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(pe.grad, pc.grad, rtol=1e-4, atol=1e-6), name
    assert list(eager.state_dict()) == list(compiled.state_dict())  # export sees the same names


def test_compiled_document_mask_follows_every_batch():
    """Flex's block mask is made in a compiled function from each batch's BOS positions: batches with documents
    starting elsewhere (and none) score as the eager boolean mask does, so no mask outlives its batch. Forward only:
    flex_attention has no CPU backward."""
    eager, compiled = twins(DOC_MASK="1", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="128")
    plan = plan_for(eager.cfg, eager.cfg.repeats)
    for boundaries in ([[5, 30], [17]], [[40], [3, 9, 50]], [[], []]):
        x = torch.randint(2, 128, (2, 64))
        for row, starts in enumerate(boundaries):
            x[row, starts] = BOS_ID
        with torch.no_grad():
            want, got = eager.logits(x, plan, Blocks.EAGER), compiled.logits(x, plan, Blocks.COMPILED)
        assert torch.allclose(want, got, rtol=1e-4, atol=1e-5), boundaries
