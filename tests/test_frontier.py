"""The frontier record's model and optimizer pieces, each against what it promises (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import PLAIN_SHAPE
import torch.nn.functional as F

from train_gpt import (GPT, Fanout, Muon, apply_rotary, build_config, build_optimizers, lr_multiplier, mix_skip,
                       plan_for, rms_norm, rotary_tables, sum_tensors)

FRONTIER = dict(NUM_UNIQUE_LAYERS=6, NUM_LAYERS=10, LOOP_START=2, LOOP_END=3, XSA_LAST_N=10, ROPE_DIMS=4,
                LN_SCALE=1, PARALLEL_RESIDUAL_START=4, SKIP_GATES_ENABLED=1, LAYER_ROWS="block", LOOP_EMBED=0)


def cfg_of(**env):
    base = dict(PLAIN_SHAPE, VOCAB_SIZE=128, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=16, TRAIN_BATCH_TOKENS=64)
    return build_config({k: str(v) for k, v in {**base, **env}.items()})


def test_plan_records_carry_the_record_layout():
    cfg = cfg_of(**FRONTIER)
    plan = plan_for(cfg, cfg.repeats)
    assert plan.blocks == (0, 1, 2, 3, 2, 3, 2, 3, 4, 5)
    assert [layer.row for layer in plan.layers] == list(plan.blocks)  # LAYER_ROWS=block: rows shared by repeats
    assert [layer.parallel for layer in plan.layers] == [b >= 4 for b in plan.blocks]
    assert [layer.norm_scale for layer in plan.layers] == [1 / math.sqrt(b + 1) for b in plan.blocks]
    # U-Net: the first 5 layers store, layers 5..9 add them back in reverse order through slots 0..4
    assert [(layer.skip_from, layer.skip_slot) for layer in plan.layers[5:]] == [(4, 0), (3, 1), (2, 2), (1, 3), (0, 4)]
    assert [layer.store for layer in plan.layers] == [True] * 5 + [False] * 5
    shallow = plan_for(cfg, 1)
    assert shallow.blocks == tuple(range(6)) and shallow.layers[3].skip_from == 2


def test_partial_rope_rotates_only_the_first_dims_and_keeps_relative_positions():
    torch.manual_seed(0)
    cos, sin = rotary_tables(12, 4, 10000.0, "cpu")
    x = torch.randn(1, 12, 1, 8)  # (B, T, H, D)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:]) and not torch.allclose(y[..., :4], x[..., :4])
    q = torch.randn(8).expand(1, 12, 1, 8)  # the same vector at every position
    k = torch.randn(8).expand(1, 12, 1, 8)
    dots = (apply_rotary(q, cos, sin)[0, :, 0, None] * apply_rotary(k, cos, sin)[0, None, :, 0]).sum(-1)
    assert torch.allclose(dots[5, 2], dots[9, 6], atol=1e-5)  # depends on the offset only


def block_inputs(cfg, parallel: float, scale: float = 1.0):
    torch.manual_seed(1)
    model = GPT(cfg)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, x0 = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    mix, a, m = model.resid_mix[0], model.attn_scale[0], model.mlp_scale[0]
    rope = rotary_tables(16, 8, 10000.0, "cpu")
    return model.blocks[0], (x, x0, mix, a, m, rope, torch.tensor([scale, parallel, 0.0]))


@pytest.mark.parametrize("parallel", [0.0, 1.0])
def test_parallel_residual_and_norm_scale_match_their_formulas(parallel):
    cfg = cfg_of(NUM_LAYERS=2, XSA_LAST_N=1)
    block, (x, x0, mix, a, m, rope, consts) = block_inputs(cfg, parallel, scale=0.5)
    h = mix[0] * x + mix[1] * x0
    attn = a * block.attn(0.5 * rms_norm(h), rope, torch.tensor(0.0))
    mlp_in = h if parallel else h + attn
    expected = h + attn + m * block.mlp(0.5 * rms_norm(mlp_in))
    assert torch.allclose(block(x, x0, (mix, a, m), rope, consts), expected, atol=1e-6)


def test_skip_gate_at_init_averages_weighted_skip_and_stream():
    model = GPT(cfg_of(**FRONTIER))
    x, skip = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        model.skip_weight[1].fill_(2.0)
    mixed = mix_skip(x, skip, model.skip_weight[1], model.skip_gate[1])
    assert torch.allclose(mixed, 0.5 * x + 0.5 * 2.0 * skip, atol=1e-6)
    plain = GPT(cfg_of(NUM_LAYERS=4, SKIP_GATES_ENABLED=0))
    assert plain.skip_gate is None and torch.allclose(mix_skip(x, skip, plain.skip_weight[0], None), x + skip)


def test_frontier_model_is_causal_and_counts_the_record_parameters():
    cfg = cfg_of(**FRONTIER, ORTHO_INIT=1)
    model = GPT(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert "loop_emb" not in names and model.attn_scale.shape[0] == 6 and model.skip_gate.shape == (5, 32)
    fc = model.blocks[0].mlp.fc.weight
    assert torch.allclose(fc.T @ fc, torch.eye(32), atol=1e-5)  # orthogonal columns (tall matrix)
    assert torch.count_nonzero(model.blocks[0].mlp.proj.weight) == 0  # zero-init projections stay zero
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # zero-init projections would hide any mixing across positions
    x = torch.randint(0, 128, (1, 16))
    plan = plan_for(cfg, cfg.repeats)
    base = model.logits(x, plan)
    x2 = x.clone()
    x2[0, 9] = (x2[0, 9] + 1) % 128
    changed = (model.logits(x2, plan) - base).abs().amax(-1)[0]
    assert changed[:9].max() == 0 and changed[9:].min() > 0


def test_fanout_gives_its_input_the_sum_of_its_consumers_gradients():
    """x0 reaches every layer through Fanout: an unused alias adds nothing, the others add their gradients."""
    x = torch.randn(3, 4, requires_grad=True)
    a, b, unused = Fanout.apply(x, 3, sum_tensors)
    assert all(t.data_ptr() == x.data_ptr() for t in (a, b, unused))
    (2 * a + b.square()).sum().backward()
    assert torch.allclose(x.grad, 2 + 2 * x.detach())


def test_per_layer_constants_compile_once():
    """Blocks with different norm scales, parallel flags and XSA share one compiled graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = cfg_of(**{**FRONTIER, "XSA_LAST_N": 3})
    model = GPT(cfg, compile=True)
    x = torch.randint(0, 128, (2, 16))
    for passes in (1, 2):
        model(x, x, plan_for(cfg, passes)).backward()
    assert sum(counters["recompiles"].values()) == 0
    # the block, the loss head, the embedding's smear and norm, the skip mix (twice: the innermost skip is the stream
    # itself), the final norm, and the sum of x0's gradients once per depth
    assert counters["stats"]["unique_graphs"] <= 8


def test_row_normalized_muon_ignores_row_scale_of_the_gradient():
    torch.manual_seed(2)
    grad = torch.randn(16, 8)
    updates = []
    for scale_row in (1.0, 100.0):
        p = torch.nn.Parameter(torch.zeros(16, 8))
        g = grad.clone()
        g[3] *= scale_row
        p.grad = g
        Muon([p], lr=1.0, momentum=0.0, backend_steps=5, weight_decay=0.0, row_normalize=True).step()
        updates.append(p.detach().clone())
    assert torch.allclose(updates[0], updates[1], atol=2e-2)


def test_decoupled_weight_decay_per_group():
    cfg = cfg_of(NUM_LAYERS=2, EMBED_WD=0.5, ADAM_WD=0.25, MUON_WEIGHT_DECAY=0.125, TIED_EMBED_LR=0.1,
                 SCALAR_LR=0.1, MATRIX_LR=0.1)
    model = GPT(cfg)
    emb, scale, mat = (t.detach().clone() for t in (model.tok_emb.weight, model.attn_scale, model.blocks[0].attn.c_q.weight))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in build_optimizers(cfg, model, 0, 1, fused=False):
        opt.step()
    assert torch.allclose(model.tok_emb.weight, emb * (1 - 0.1 * 0.5))
    assert torch.allclose(model.attn_scale, scale * (1 - 0.1 * 0.25))
    assert torch.allclose(model.blocks[0].attn.c_q.weight, mat * (1 - 0.1 * 0.125), atol=1e-6)


def test_min_lr_floors_the_warmdown():
    cfg = cfg_of(WARMDOWN_FRAC=0.5, MIN_LR=0.1)
    assert lr_multiplier(cfg, 0.4) == 1.0
    assert lr_multiplier(cfg, 0.75) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 0.99) == pytest.approx(0.1)


def test_xsa_flag_zero_is_plain_attention():
    cfg = cfg_of(NUM_LAYERS=1, XSA_LAST_N=1)
    attn = GPT(cfg).blocks[0].attn
    torch.nn.init.normal_(attn.proj.weight, std=0.1)
    x = torch.randn(2, 16, 32)
    rope = rotary_tables(16, 8, 10000.0, "cpu")
    attn.any_xsa = False
    plain = attn(x, rope, torch.tensor(1.0))
    attn.any_xsa = True
    assert torch.allclose(attn(x, rope, torch.tensor(0.0)), plain, atol=1e-6)
    assert not torch.allclose(attn(x, rope, torch.tensor(1.0)), plain, atol=1e-4)
