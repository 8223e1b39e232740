"""The depth plan, the model and the optimizer's pieces, on CPU."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import PLAIN_SHAPE

from train_gpt import (GPT, NEWTON_SCHULZ, ConfigError, build_config, core_repeats, depth_plan, newton_schulz, plan_for,
                       softcap_cross_entropy, softcap_logits, unet_pairs)


@pytest.mark.parametrize("unique, start, end, layers, expected", [
    (3, 0, 2, 9, [0, 1, 2, 0, 1, 2, 0, 1, 2]),
    (9, 0, 8, 9, list(range(9))),
    (11, 3, 5, 17, [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]),
    (1, 0, 0, 9, [0] * 9),
    (5, 2, 2, 7, [0, 1, 2, 2, 2, 3, 4]),
])
def test_design_examples(unique, start, end, layers, expected):
    repeats = core_repeats(unique, start, end, layers)
    assert list(depth_plan(unique, start, end, repeats).blocks) == expected


@pytest.mark.parametrize("unique, start, end, layers, hint", [
    (3, 0, 2, 10, "9, 12"), (11, 3, 5, 16, "11, 14, 17"), (4, 0, 3, 3, "4, 8")])
def test_impossible_depth_names_values_that_work(unique, start, end, layers, hint):
    with pytest.raises(ConfigError, match=f"NUM_LAYERS={layers}.*{hint}"):
        core_repeats(unique, start, end, layers)


def test_plan_from_config_and_xsa_on_last_layers():
    cfg = build_config({"NUM_LAYERS": "17", "NUM_UNIQUE_LAYERS": "11", "LOOP_START": "3", "LOOP_END": "5",
                        "XSA_LAST_N": "4"})
    plan = plan_for(cfg, cfg.repeats)
    assert cfg.repeats == 3 and len(plan.blocks) == 17
    assert [layer.xsa for layer in plan.layers] == [False] * 13 + [True] * 4
    assert list(plan_for(cfg, 1).blocks) == list(range(11))


@pytest.mark.parametrize("depth", range(1, 20))
def test_unet_pairs_mirror_and_precede(depth):
    pairs = unet_pairs(depth)
    assert len(pairs) == depth // 2
    encoders, decoders = [e for e, _ in pairs], [d for _, d in pairs]
    assert sorted(encoders) == list(range(depth // 2)) and len(set(decoders)) == len(decoders)
    assert all(e < d < depth for e, d in pairs)
    assert all(e + d == 2 * (depth // 2) - 1 for e, d in pairs)


def tiny_cfg(**env):
    """A tiny plain stack, 2 layers unless NUM_LAYERS says otherwise (the default's 17 cost the tests minutes)."""
    base = {**PLAIN_SHAPE, "VOCAB_SIZE": "256", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
            "NUM_LAYERS": "2", "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "128"}
    return build_config({**base, **{k: str(v) for k, v in env.items()}})


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameters_grow_with_passes_only_by_per_layer_rows():
    dim = 32
    rows = dict(LAYER_ROWS="virtual", LOOP_EMBED=1, SKIP_GATES_ENABLED=0,  # rows per virtual layer, as counted below
                PARALLEL_LANES_START=-1)  # (9 unshared blocks would add lanes from block 8)
    one = GPT(tiny_cfg(NUM_LAYERS=3, NUM_UNIQUE_LAYERS=3, **rows))
    three = GPT(tiny_cfg(NUM_LAYERS=9, NUM_UNIQUE_LAYERS=3, **rows))
    unshared = GPT(tiny_cfg(NUM_LAYERS=9, **rows))
    # per virtual layer: loop embedding, attention scale, MLP scale, 2 residual-mix rows; a skip row per pair
    rows = lambda depth: depth * 5 * dim + max(1, depth // 2) * dim  # noqa: E731
    assert count(three) - count(one) == rows(9) - rows(3)
    block = sum(p.numel() for p in unshared.blocks[0].parameters())
    assert count(unshared) - count(three) == 6 * block


@pytest.mark.parametrize("dtype, compiled", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.bfloat16, True)])
def test_loss_head_gradient_formed_in_forward_matches_autograd(dtype, compiled):
    """The training loss forms its logits' gradient in the forward: its loss and gradients are as close to float64 as
    plain autograd through F.cross_entropy on the same softcapped logits is, and the float32 weight gets a float32
    gradient."""
    torch.manual_seed(0)
    h0, w0, targets, cap = torch.randn(2, 96, 32), torch.randn(512, 32) * 0.3, torch.randint(0, 512, (2, 96)), 30.0

    def plain(h, w):
        return torch.nn.functional.cross_entropy(softcap_logits(h, w, cap).flatten(0, -2), targets.reshape(-1))

    def fused(h, w):
        return softcap_cross_entropy(h, w, targets, cap)

    def run(loss_fn, h_dtype, w_dtype):
        h, w = h0.to(h_dtype).clone().requires_grad_(), w0.to(w_dtype).clone().requires_grad_()
        loss = loss_fn(h, w)
        loss.backward()
        return [t.double() for t in (loss, h.grad, w.grad)], w.grad.dtype

    gold = run(plain, torch.float64, torch.float64)[0]
    plain_out = run(plain, dtype, torch.float32)[0]
    fused_out, w_grad_dtype = run(torch.compile(fused, fullgraph=True) if compiled else fused, dtype, torch.float32)
    assert w_grad_dtype == torch.float32
    for got, ref, exact in zip(fused_out, plain_out, gold):
        scale = exact.abs().max()
        assert (got - exact).abs().max() / scale <= 1.5 * (ref - exact).abs().max() / scale + 1e-6


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    cfg = tiny_cfg(NUM_LAYERS=4, NUM_UNIQUE_LAYERS=2, XSA_LAST_N=2)
    model = GPT(cfg)
    x = torch.randint(0, 256, (4, 16))
    loss = model(x, torch.randint(0, 256, (4, 16)), plan_for(cfg, cfg.repeats))
    assert abs(loss.item() - math.log(256)) < 0.02


@pytest.mark.parametrize("env", [dict(NUM_LAYERS=4), dict(NUM_LAYERS=6, NUM_UNIQUE_LAYERS=2, XSA_LAST_N=3,
                                                          MLP_ACT="leaky_relu2")])
def test_model_is_causal(env):
    """Changing token t changes no logit before t (after training-like random weights)."""
    torch.manual_seed(1)
    cfg = tiny_cfg(**env)
    model = GPT(cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    plan = plan_for(cfg, cfg.repeats)
    x = torch.randint(0, 256, (2, 16))
    t = 9
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 256
    a, b = model.logits(x, plan), model.logits(y, plan)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_xsa_removes_the_component_along_the_own_value():
    torch.manual_seed(2)
    cfg = tiny_cfg(NUM_LAYERS=1, XSA_LAST_N=1)
    attn = GPT(cfg).blocks[0].attn
    captured = {}
    attn.proj.register_forward_hook(lambda m, inp, out: captured.setdefault("y", inp[0]))
    x = torch.randn(2, 16, 32)
    from train_gpt import rotary_tables
    attn(x, rotary_tables(16, 8, 10000.0, x.device), xsa=torch.tensor(1.0))
    y = captured["y"].view(2, 16, 4, 8)
    v = attn.c_v(x).view(2, 16, 2, 8).repeat_interleave(2, dim=2)
    along_own_value = (y * torch.nn.functional.normalize(v, dim=-1)).sum(-1)
    assert along_own_value.abs().max() < 1e-5 and y[:, 1:].norm() > 1.0


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_xsa_equals_the_projection_on_the_normalized_own_value(dtype, tol):
    """XSA at strength s is y - s (y . v)/(v . v) v: the same as y - s (y . n) n with n = v/|v|, checked in float64
    against what the layer computes from its own attention output and values, in float32 and bf16."""
    torch.manual_seed(4)
    cfg = tiny_cfg(NUM_LAYERS=1, XSA_LAST_N=1)
    attn = GPT(cfg).blocks[0].attn.to(dtype)
    seen, attend = {}, attn.attend
    attn.attend = lambda q, k, v, mask: seen.setdefault("y", attend(q, k, v, mask))
    attn.proj.register_forward_hook(lambda m, inp, out: seen.setdefault("out", inp[0]))
    x = torch.randn(2, 16, 32, dtype=dtype)
    from train_gpt import rotary_tables
    attn(x, rotary_tables(16, 8, 10000.0, x.device), xsa=torch.tensor(0.7))
    y = seen["y"].double().reshape(2, 16, 2, 2, 8)
    n = torch.nn.functional.normalize(attn.c_v(x).double().view(2, 16, 2, 8), dim=-1)[:, :, :, None]
    expected = (y - 0.7 * (y * n).sum(-1, keepdim=True) * n).reshape(2, 16, 32)
    assert (seen["out"].double().reshape(2, 16, 32) - expected).abs().max() < tol * expected.abs().max()


@pytest.mark.parametrize("shape", [(64, 128), (256, 64), (128, 512), (96, 300)])
def test_newton_schulz_singular_values(shape):
    torch.manual_seed(3)
    g = torch.randn(*shape)
    s = torch.linalg.svdvals(newton_schulz(g, 5).float())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())
    assert newton_schulz(g, 5).shape == g.shape


def test_newton_schulz_on_the_cpu_iterates_in_float32_and_returns_bf16():
    """A CPU emulates bf16 matmuls (6-25x slower there on Muon's shapes), so the iterations run in float32 and only
    the result is rounded to bf16: within bf16's rounding of the float64 iteration (5e-4 here), where bf16 iterations
    drift 1.5e-2."""
    torch.manual_seed(0)
    g = torch.randn(4, 128, 512)
    x = (g / g.norm(dim=(-2, -1), keepdim=True)).double()
    for a, b, c in NEWTON_SCHULZ["polar"][:5]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    out = newton_schulz(g, 5, method="polar")
    assert out.dtype == torch.bfloat16 and (out.double() - x).abs().max() < 2e-3


def test_polar_express_lands_closer_to_orthogonal_than_the_quintic_in_five_steps():
    """Singular values spanning 100x: five quintic steps leave them in ~[0.68, 1.2], five Polar Express steps in
    ~[0.86, 1.14] (the band its minimax coefficients promise); its sixth and later converge to 1 (bf16's)."""
    torch.manual_seed(5)
    u, v = torch.linalg.qr(torch.randn(128, 128))[0], torch.linalg.qr(torch.randn(256, 128))[0]
    for g in ((u * torch.logspace(0, -2, 128)) @ v.T, v @ (u * torch.logspace(0, -2, 128))):  # wide and tall
        def singular_values(method, steps=5):
            return torch.linalg.svdvals(newton_schulz(g, steps, method=method).float())
        quintic, polar = singular_values("quintic"), singular_values("polar")
        assert 0.6 < quintic.min() < 0.75 and 1.15 < quintic.max() < 1.25
        assert 0.85 < polar.min() and polar.max() < 1.15
        assert (polar - 1).abs().max() < 0.5 * (quintic - 1).abs().max()
        assert (singular_values("polar", 7) - 1).abs().max() < 0.02
        assert (singular_values("quintic", 7) - 1).abs().max() > 0.25  # the quintic never converges


def test_muon_ns_reaches_the_optimizer():
    from train_gpt import build_optimizers

    cfg = tiny_cfg(NUM_LAYERS=2, MUON_NS="polar")
    muon = build_optimizers(cfg, GPT(cfg), 0, 1, fused=False)[1]
    assert [g["method"] for g in muon.param_groups] == ["polar"]


@pytest.mark.parametrize("method", ["quintic", "polar"])
def test_batched_muon_matches_a_per_matrix_reference(method):
    from train_gpt import Muon

    torch.manual_seed(4)
    shapes = [(64, 32), (32, 64), (64, 32), (48, 48), (32, 64)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    opt = Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01, method=method)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # the textbook update, one matrix at a time
            bufs[i] = 0.9 * bufs[i] + g
            u = newton_schulz(g + 0.9 * bufs[i], 5, method=method).float() * max(1.0, g.size(0) / g.size(1)) ** 0.5
            ref[i] = ref[i] * (1 - 0.1 * 0.01) - 0.1 * u
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach(), r, atol=2e-3), (p.detach() - r).abs().max()


def test_export_reserve_shortens_the_training_clock():
    from train_gpt import run_fraction, training_seconds

    cfg = build_config({"MAX_WALLCLOCK_SECONDS": "100", "EXPORT_RESERVE_SECONDS": "10", "ITERATIONS": "0"})
    assert training_seconds(cfg) == 90 and run_fraction(cfg, 5, 45.0) == 0.5 and run_fraction(cfg, 9, 95.0) == 1.0
    with pytest.raises(ConfigError, match="EXPORT_RESERVE_SECONDS"):
        build_config({"MAX_WALLCLOCK_SECONDS": "100", "EXPORT_RESERVE_SECONDS": "100"})


def test_the_model_holds_no_buffers_so_ddp_broadcasts_nothing():
    """build_model leaves DDP's buffer broadcast at its default: with no buffers it sends nothing each forward."""
    for env in ({}, {"LOOP_EMBED": "1", "ATTN_GATE": "0.5", "LAYER_ROWS": "virtual", "PARALLEL_LANES_START": "-1"}):
        assert list(GPT(build_config(env)).buffers()) == []
