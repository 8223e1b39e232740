"""The later records' model pieces (issue 14), each against what it promises, on CPU: document-masked
attention (DOC_MASK), the smear gate (SMEAR_GATE), FlashAttention 3 when installed."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import PLAIN_SHAPE, tokenizer_path, trained_like

import train_gpt
from train_gpt import (BOS_ID, GPT, Blocks, attention_backend_name, build_config, build_optimizers, config_for_artifact,
                       export_recipe, model_meta, plan_for, quantize_state)

VOCAB = 128


def cfg_of(**env):
    base = dict(PLAIN_SHAPE, VOCAB_SIZE=VOCAB, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=48,
                TRAIN_BATCH_TOKENS=96, NUM_LAYERS=3, XSA_LAST_N=1, ROPE_DIMS=4, GATE_WINDOW=6)
    return build_config({k: str(v) for k, v in {**base, **env}.items()})


def document(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [BOS_ID] + torch.randint(2, VOCAB, (length - 1,), generator=g).tolist()


# a row as training and evaluation windows see it: the tail of a document, then whole ones, one cut short
TAIL, DOCS = torch.randint(2, VOCAB, (5,), generator=torch.Generator().manual_seed(9)).tolist(), [11, 1, 17, 14]
ROW = TAIL + sum((document(n, i) for i, n in enumerate(DOCS)), [])


def pieces(row: list[int]) -> list[list[int]]:
    starts = [i for i, t in enumerate(row) if t == BOS_ID and i > 0]
    return [row[a:b] for a, b in zip([0] + starts, starts + [len(row)])]


@pytest.mark.parametrize("extras", [{}, dict(SMEAR_GATE=1, NUM_KV_HEADS=4)])
def test_doc_mask_equals_running_each_document_alone(extras):
    """RoPE sees only offsets, so a document's logits do not depend on where in the row it starts."""
    cfg = cfg_of(DOC_MASK=1, **extras)
    model, plan = trained_like(cfg), plan_for(cfg, cfg.repeats)
    x = torch.tensor([ROW, ROW[::-1]])
    with torch.no_grad():
        together = model.logits(x, plan)
        for r, row in enumerate(x.tolist()):
            at = 0
            for piece in pieces(row):
                alone = model.logits(torch.tensor([piece]), plan)[0]
                assert torch.allclose(together[r, at:at + len(piece)], alone, atol=2e-5), (r, at)
                at += len(piece)
    assert together.shape == (2, len(ROW), VOCAB)


def test_doc_mask_off_lets_documents_see_each_other():
    model = trained_like(cfg_of())
    x = torch.tensor([ROW])
    first = len(TAIL)
    with torch.no_grad():
        together = model.logits(x, plan_for(model.cfg, 1))[0, first:first + DOCS[0]]
        alone = model.logits(x[:, first:first + DOCS[0]], plan_for(model.cfg, 1))[0]
    assert not torch.allclose(together, alone, atol=1e-3)  # the check above is not vacuous


@pytest.mark.parametrize("env", [dict(DOC_MASK=1, SMEAR_GATE=1), dict(DOC_MASK=1, SMEAR_GATE=1, NUM_LAYERS=4),
                                 dict(DOC_MASK=1, SMEAR_GATE=1, ATTN_GATE=0.5)])
def test_nothing_crosses_a_bos_forward_or_backward(env):
    """Changing the previous document (its last token included) leaves every output of the next one unchanged,
    and a loss on the next document sends no gradient to the previous one's embedded tokens (the lookups: the
    tied table is also the head, whose every row a softmax reaches)."""
    cfg = cfg_of(**env)
    model, plan = trained_like(cfg, seed=1), plan_for(cfg, cfg.repeats)
    prev = torch.arange(100, 100 + 12)  # ids used nowhere else in the row
    nxt = torch.tensor(document(20, 3)).clamp(max=99)
    x = torch.cat([prev, nxt])[None]
    changed = x.clone()
    changed[0, :12] = torch.arange(112, 124)
    b = model.logits(changed, plan)
    embedded = []
    model.tok_emb.register_forward_hook(lambda module, inputs, out: embedded.append(out) or out.retain_grad())
    a = model.logits(x, plan)
    assert torch.equal(a[0, 12:], b[0, 12:]) and not torch.allclose(a[0, :12], b[0, :12])
    a[0, 12:].logsumexp(-1).sum().backward()
    grad = embedded[0].grad[0]
    assert grad[:12].abs().max() == 0 and grad[12:].abs().sum() > 0


@pytest.mark.parametrize("position, reaches", [(2, [2, 3]), (4, [4])])  # position 5 is the next document's BOS
def test_smear_gate_mixes_in_the_previous_token_within_a_document_only(position, reaches):
    cfg = cfg_of(SMEAR_GATE=1)
    model = trained_like(cfg, seed=2)
    x = torch.tensor([document(5, 4) + document(5, 7)])
    y = x.clone()
    y[0, position] = (x[0, position] - 1) % (VOCAB - 2) + 2  # another token, not a BOS
    no_layers = plan_for(cfg, 1)._replace(layers=())  # no attention: a position sees another only through the smear
    with torch.no_grad():
        changed = (model.hidden(x, no_layers) - model.hidden(y, no_layers)).abs().amax(-1)[0]
    assert (changed > 0).nonzero().flatten().tolist() == reaches


def test_smear_gate_at_init_is_off_and_learns():
    cfg = cfg_of(SMEAR_GATE=1)
    torch.manual_seed(3)
    smeared, plain = GPT(cfg), GPT(cfg_of())
    plain.load_state_dict({k: v for k, v in smeared.state_dict().items() if k != "smear"})
    x = torch.tensor([document(16, 5), document(16, 6)])
    plan = plan_for(cfg, cfg.repeats)
    assert torch.equal(smeared.logits(x, plan), plain.logits(x, plan))
    smeared(x, x, plan).backward()
    assert smeared.smear.grad[0] != 0  # lambda moves first; w gets gradient once lambda is nonzero


def test_new_parameters_go_to_adam_stay_float_in_the_artifact_and_travel_with_it():
    shape = dict(MODEL_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=4, TOKENIZER_PATH=tokenizer_path(1024))
    cfg = cfg_of(SMEAR_GATE=1, DOC_MASK=1, GATE_WINDOW=12, ATTN_GATE=0.5, **shape)
    model = GPT(cfg)
    adam, muon = build_optimizers(cfg, model, 0, 1, fused=False)  # asserts every parameter is in a group
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    scalars = {id(p) for p in adam.param_groups[1]["params"]}
    gates = [model.smear] + [b.attn.gate for b in model.blocks]  # the attention gates are 2-D: not Muon's
    assert all(id(g) in scalars and id(g) not in in_muon for g in gates)
    assert len(in_muon) == 6 * len(model.blocks)  # the blocks' six matrices each
    stored = quantize_state(model.state_dict(), export_recipe(cfg))
    assert stored["smear"].bits == 0 and stored["blocks.0.attn.gate"].bits == 0
    assert stored["blocks.0.attn.c_q.weight"].bits > 0  # the matrices beside them are still quantized
    meta = model_meta(cfg)["model"]
    assert (meta["smear_gate"], meta["gate_window"], meta["attn_gate"], meta["doc_mask"]) == (True, 12, 0.5, True)
    back = config_for_artifact(cfg_of(**shape), model_meta(cfg), "a.ptz")
    assert (back.smear_gate, back.gate_window, back.attn_gate, back.doc_mask) == (True, 12, 0.5, True)
    older = model_meta(cfg)
    del older["model"]["attn_gate"]  # an artifact written before the knob: a model without the gate
    assert config_for_artifact(cfg_of(ATTN_GATE=0.5, **shape), older, "a.ptz").attn_gate == 0.0


def test_attention_gate_at_init_halves_each_head_and_learns():
    """ATTN_GATE=s: sigmoid(s * w_h . x[:GATE_WINDOW]) times each head's output before the projection; w starts at
    zero, so the layer's attention output starts at half, and w gets gradient at once."""
    torch.manual_seed(4)
    gated, plain = GPT(cfg_of(ATTN_GATE=0.5, NUM_LAYERS=1)), GPT(cfg_of(NUM_LAYERS=1))
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.endswith("attn.gate")})
    attn_g, attn_p = gated.blocks[0].attn, plain.blocks[0].attn
    attn_p.proj.weight.data.normal_()
    attn_g.proj.weight.data.copy_(attn_p.proj.weight)
    x = torch.randn(2, 48, 32)
    rope = train_gpt.rotary_tables(48, 4, 10000.0, "cpu")
    out_g, out_p = (a(x, rope, torch.tensor(1.0)) for a in (attn_g, attn_p))
    assert torch.allclose(out_g, 0.5 * out_p, atol=1e-6)
    out_g.square().sum().backward()
    assert attn_g.gate.grad.abs().sum() > 0


def test_compiled_blocks_mask_through_flex_attention_equal_to_eager_and_compile_once():
    """Compiled blocks get a flex_attention block mask, a new one (a new closure over its document ids) per batch:
    each batch reuses the one graph, and agrees with the eager blocks' boolean mask."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = cfg_of(DOC_MASK=1, NUM_LAYERS=1, SMEAR_GATE=1)
    model = trained_like(cfg)
    # backend "eager": dynamo's graph capture and guards as on the GPU, without inductor (no CPU flex kernel yet)
    model.compiled_blocks = [torch.compile(b, backend="eager", fullgraph=True, dynamic=False) for b in model.blocks]
    plan = plan_for(cfg, 1)
    with torch.no_grad():  # flex_attention has no backward on the CPU
        for seed in range(3):
            x = torch.tensor([document(20, seed) + document(28, seed + 10), document(48, seed + 20)])
            assert torch.allclose(model.logits(x, plan), model.logits(x, plan, Blocks.EAGER), atol=1e-5)
    assert sum(counters["recompiles"].values()) == 0 and counters["stats"]["unique_graphs"] == 1


def test_config_validates_the_new_knobs():
    with pytest.raises(train_gpt.ConfigError, match="GATE_WINDOW=40"):
        cfg_of(GATE_WINDOW=40)
    with pytest.raises(train_gpt.ConfigError, match="MUON_NS"):
        cfg_of(MUON_NS="cubic")


def varlen_reference(q, k, v, cu: list, causal: bool) -> torch.Tensor:
    """FA3's varlen kernel by its definition, on packed (N, H, D) tensors: segment i is rows cu[i]..cu[i+1] (empty
    ones allowed), attended to alone, causal SDPA, k and v's heads repeated for GQA; the segments must tile all N."""
    assert cu[0] == 0 and cu[-1] == len(q) and cu == sorted(cu)
    k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=causal)
                      .transpose(0, 1) for a, b in zip(cu, cu[1:])])


def flash_attn_stand_in(monkeypatch, returns_lse: bool = False, rows_only: bool = False) -> list:
    """A module flash_attn_interface whose flash_attn_func is SDPA on FA3's (B, T, H, D) layout (as the GPU-less
    shim of shared/bench) and flash_attn_varlen_func the reference above; it records each call's shapes, dtype and
    causal flag (and the varlen's cu and max_seqlen), in the list returned. rows_only: a varlen kernel that drops
    every segment start but the rows' (as if cu had no BOS), to show the tests below would catch it."""
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append((tuple(q.shape), tuple(k.shape), q.dtype, causal))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                           enable_gqa=k.size(2) != q.size(2)).transpose(1, 2).contiguous()
        return (y, torch.zeros(q.shape[:3])) if returns_lse else y

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        calls.append((tuple(q.shape), tuple(k.shape), q.dtype, causal, cu_seqlens_q, max_seqlen_q))
        cu = [c for c in cu_seqlens_q.tolist() if c % max_seqlen_q == 0 or not rows_only]
        assert max(b - a for a, b in zip(cu, cu[1:])) <= max_seqlen_q
        y = varlen_reference(q, k, v, cu, causal)
        return (y, torch.zeros(q.shape[:2])) if returns_lse else y

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(
        flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func))
    return calls


@pytest.mark.parametrize("returns_lse", [False, True])
@pytest.mark.parametrize("extras", [{}, dict(NUM_KV_HEADS=4, XSA_LAST_N=0)])
def test_flash_attention_gives_the_sdpa_output_with_kv_heads_as_they_are(monkeypatch, extras, returns_lse):
    """ATTN_BACKEND=auto with flash_attn_interface importable: a compiled CUDA run says fa3 and its blocks call
    flash_attn_func (bf16, causal, k/v with NUM_KV_HEADS heads); logits and gradients are the SDPA path's."""
    calls = flash_attn_stand_in(monkeypatch, returns_lse)
    cfg = cfg_of(**extras)
    assert attention_backend_name(cfg, "cuda") == "fa3" and attention_backend_name(cfg, "cpu") == "sdpa"
    sdpa, fa3 = GPT(cfg, torch.bfloat16), GPT(cfg, torch.bfloat16, fa3=True)  # bf16 as on CUDA
    sdpa.load_state_dict(trained_like(cfg).state_dict())
    fa3.load_state_dict(sdpa.state_dict())
    plan, x = plan_for(cfg, cfg.repeats), torch.tensor([ROW, ROW[::-1]])
    with torch.no_grad():
        assert torch.allclose(fa3.logits(x, plan), sdpa.logits(x, plan), atol=1e-3)
    B, T, H, kv = 2, len(ROW), cfg.num_heads, cfg.num_kv_heads
    assert calls == [((B, T, H, 8), (B, T, kv, 8), torch.bfloat16, True)] * cfg.num_layers
    fa3(x, x, plan).backward(), sdpa(x, x, plan).backward()  # training's path: the same gradients
    assert torch.allclose(fa3.blocks[0].attn.c_q.weight.grad, sdpa.blocks[0].attn.c_q.weight.grad, atol=1e-3)


@pytest.mark.parametrize("env, device, name", [(dict(ATTN_BACKEND="sdpa"), "cuda", "sdpa"), ({}, "cpu", "sdpa"),
                                               (dict(COMPILE=0), "cuda", "sdpa"), (dict(DOC_MASK=1), "cpu", "sdpa"),
                                               (dict(DOC_MASK=1, ATTN_BACKEND="sdpa"), "cuda", "flex_attention")])
def test_flash_attention_is_not_called_when_ruled_out(monkeypatch, env, device, name):
    """ATTN_BACKEND=sdpa (DOC_MASK=1: flex_attention), the CPU and eager runs keep their kernels: nothing calls FA3."""
    calls = flash_attn_stand_in(monkeypatch)
    cfg = cfg_of(**env)
    assert attention_backend_name(cfg, device) == name
    model = GPT(cfg, torch.bfloat16, fa3=name == "fa3")
    with torch.no_grad():
        model.logits(torch.tensor([ROW]), plan_for(cfg, cfg.repeats))
    assert calls == []


def test_without_flash_attention_installed_nothing_changes(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import raises ImportError, as when not installed
    assert attention_backend_name(cfg_of(), "cuda") == "sdpa" and attention_backend_name(cfg_of(), "cpu") == "sdpa"
    assert attention_backend_name(cfg_of(DOC_MASK=1), "cuda") == "flex_attention"
    assert attention_backend_name(cfg_of(DOC_MASK=1, COMPILE=0), "cuda") == "sdpa"


def varlen_model(cfg, monkeypatch, dtype=torch.bfloat16, **stand_in) -> tuple[GPT, list]:
    """A GPT given FA3 (the stand-in), with the trained_like weights; its blocks stand for the compiled twins
    (GPT.hidden tells twins from the eager blocks by identity), which on CUDA call the varlen kernel."""
    calls = flash_attn_stand_in(monkeypatch, **stand_in)
    model = GPT(cfg, dtype, fa3=True)
    model.load_state_dict(trained_like(cfg).state_dict())
    model.compiled_blocks = list(model.blocks)
    return model, calls


@pytest.mark.parametrize("returns_lse", [False, True])
@pytest.mark.parametrize("extras", [{}, dict(SMEAR_GATE=1, NUM_KV_HEADS=4, XSA_LAST_N=0)])
def test_doc_mask_through_fa3_varlen_equals_the_boolean_mask(monkeypatch, extras, returns_lse):
    """DOC_MASK=1 with FA3 importable: a compiled CUDA run says fa3_varlen and its blocks call flash_attn_varlen_func
    on the flattened batch (bf16, k/v with NUM_KV_HEADS heads) with cu = every row start and every BOS, then B*T,
    padded with B*T to a multiple of 64 (int32); logits and gradients are the eager blocks' boolean mask's: exactly
    in float32, to bf16's rounding in bf16 (the two kernels round differently, unlike the dense test's one)."""
    cfg = cfg_of(DOC_MASK=1, **extras)
    model, calls = varlen_model(cfg, monkeypatch, returns_lse=returns_lse)
    assert attention_backend_name(cfg, "cuda") == "fa3_varlen"
    plan = plan_for(cfg, cfg.repeats)
    x = torch.tensor([ROW, ROW[::-1], document(20, 5) + document(28, 6)])  # the last row starts with a BOS
    with torch.no_grad():
        assert torch.allclose(model.logits(x, plan), model.logits(x, plan, Blocks.EAGER), atol=5e-2)
    (B, T), H, kv = x.shape, cfg.num_heads, cfg.num_kv_heads
    starts = sorted({r * T for r in range(B)} | {i for i, t in enumerate(x.flatten().tolist()) if t == BOS_ID})
    assert len(starts) == 3 + 4 + 4 + 1  # rows, ROW's BOS, ROW[::-1]'s, the last row's second
    assert len(calls) == cfg.num_layers
    for q_shape, k_shape, dtype, causal, cu, max_seqlen in calls:
        assert (q_shape, k_shape, dtype, causal, max_seqlen) == ((B * T, H, 8), (B * T, kv, 8), torch.bfloat16, True, T)
        assert cu.dtype == torch.int32 and cu.tolist() == starts + [B * T] * (64 - len(starts))
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t)  # FA3's cast a no-op: float32 throughout
    model, _ = varlen_model(cfg, monkeypatch, torch.float32, returns_lse=returns_lse)
    with torch.no_grad():
        assert torch.allclose(model.logits(x, plan), model.logits(x, plan, Blocks.EAGER), atol=1e-5)
    eager = GPT(cfg)  # the same weights, no compiled twins: the boolean mask
    eager.load_state_dict(model.state_dict())
    model(x, x, plan).backward(), eager(x, x, plan).backward()  # training's path: the same gradients
    assert torch.allclose(model.blocks[0].attn.c_q.weight.grad, eager.blocks[0].attn.c_q.weight.grad, atol=1e-5)


def test_fa3_varlen_lets_nothing_cross_a_bos_and_a_cu_without_the_bos_would(monkeypatch):
    """Through the varlen path, changing the previous document leaves the next one's logits unchanged; a kernel
    given only the row starts (the stand-in's rows_only) lets the next document see the previous one."""
    cfg = cfg_of(DOC_MASK=1, SMEAR_GATE=1)
    plan, prev, nxt = plan_for(cfg, cfg.repeats), torch.arange(100, 112), torch.tensor(document(20, 3)).clamp(max=99)
    x = torch.stack([torch.cat([prev, nxt]), torch.cat([nxt, prev])])
    changed = x.clone()
    changed[0, :12] = torch.arange(112, 124)
    for rows_only in (False, True):
        model, calls = varlen_model(cfg, monkeypatch, rows_only=rows_only)
        with torch.no_grad():
            a, b = model.logits(x, plan), model.logits(changed, plan)
        assert len(calls) == 2 * cfg.num_layers and not torch.allclose(a[0, :12], b[0, :12])
        assert torch.equal(a[1], b[1])  # the other row
        assert torch.equal(a[0, 12:], b[0, 12:]) != rows_only


def broken_stand_in(monkeypatch, fault: str) -> None:
    """The stand-in above with one fault: its dense or its varlen kernel wrong (non-causal: later tokens leak), or
    raising (as an FA3 build for another GPU does)."""
    flash_attn_stand_in(monkeypatch)
    good = sys.modules["flash_attn_interface"]

    def leaky_dense(q, k, v, causal=False):
        return good.flash_attn_func(q, k, v, causal=False)

    def leaky_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        return good.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, False)

    def raising(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Hopper GPUs")

    dense, varlen = {"dense": (leaky_dense, good.flash_attn_varlen_func),
                     "varlen": (good.flash_attn_func, leaky_varlen), "raising": (raising, raising)}[fault]
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(
        flash_attn_func=dense, flash_attn_varlen_func=varlen))


@pytest.mark.parametrize("fault, doc_mask, expected", [
    (None, 0, None), (None, 1, None),
    ("dense", 0, "causal attention's output differs"), ("varlen", 1, "varlen attention's output differs"),
    ("varlen", 0, None),  # without DOC_MASK the varlen kernel is never called: not checked, not needed
    ("raising", 0, "causal attention raised RuntimeError: FlashAttention only supports Hopper GPUs"),
])
def test_flash_attention_is_checked_against_pytorch_before_the_run_uses_it(monkeypatch, capsys, fault, doc_mask,
                                                                           expected):
    """FA3 when it imports: right, it stays (one line says so); wrong or raising, one line says what and the run uses
    PyTorch's attention (the model's blocks lose it before anything compiles)."""
    if fault is None:
        flash_attn_stand_in(monkeypatch)
    else:
        broken_stand_in(monkeypatch, fault)
    cfg = cfg_of(DOC_MASK=doc_mask, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=128)
    fault_found = train_gpt.flash_attention_fault(cfg, sys.modules["flash_attn_interface"], torch.device("cpu"))
    assert fault_found == expected or (expected and fault_found.startswith(expected)), fault_found
    model = GPT(cfg, torch.bfloat16, fa3=True)
    train_gpt.use_flash_attention_if_sound(cfg, train_gpt.Runtime(0, 1, 0, torch.device("cpu")), model)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("attention_check fa3:")]
    assert len(line) == 1 and (expected is None) == model.fa3
    assert all((block.attn.fa3 is None) == (expected is not None) for block in model.blocks)
    assert ("uses PyTorch's attention instead" in line[0]) == (expected is not None)
