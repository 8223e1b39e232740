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
from train_gpt import (BOS_ID, GPT, attention_backend_name, build_config, build_optimizers, config_for_artifact,
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


@pytest.mark.parametrize("env", [dict(DOC_MASK=1, SMEAR_GATE=1), dict(DOC_MASK=1, SMEAR_GATE=1, TIE_EMBEDDINGS=0,
                                                                      NUM_LAYERS=4)])
def test_nothing_crosses_a_bos_forward_or_backward(env):
    """Changing the previous document (its last token included) leaves every output of the next one unchanged,
    and a loss on the next document sends no gradient to the previous one's token embeddings."""
    cfg = cfg_of(**{"TIE_EMBEDDINGS": 0, **env})
    model, plan = trained_like(cfg, seed=1), plan_for(cfg, cfg.repeats)
    prev = torch.arange(100, 100 + 12)  # ids used nowhere else in the row
    nxt = torch.tensor(document(20, 3)).clamp(max=99)
    x = torch.cat([prev, nxt])[None]
    changed = x.clone()
    changed[0, :12] = torch.arange(112, 124)
    a, b = model.logits(x, plan), model.logits(changed, plan)
    assert torch.equal(a[0, 12:], b[0, 12:]) and not torch.allclose(a[0, :12], b[0, :12])
    a[0, 12:].logsumexp(-1).sum().backward()
    grad = model.tok_emb.weight.grad
    assert grad[100:112].abs().max() == 0 and grad[nxt].abs().sum() > 0


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
    cfg = cfg_of(SMEAR_GATE=1, DOC_MASK=1, GATE_WINDOW=12, **shape)
    model = GPT(cfg)
    adam, muon = build_optimizers(cfg, model, 0, 1, fused=False)  # asserts every parameter is in a group
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    scalars = {id(p) for p in adam.param_groups[1]["params"]}
    assert id(model.smear) in scalars and id(model.smear) not in in_muon
    stored = quantize_state(model.state_dict(), export_recipe(cfg))
    assert stored["smear"].bits == 0
    assert stored["blocks.0.attn.c_q.weight"].bits > 0  # the matrices beside them are still quantized
    meta = model_meta(cfg)["model"]
    assert (meta["smear_gate"], meta["gate_window"], meta["doc_mask"]) == (True, 12, True)
    back = config_for_artifact(cfg_of(**shape), model_meta(cfg), "a.ptz")
    assert (back.smear_gate, back.gate_window, back.doc_mask) == (True, 12, True)


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
            assert torch.allclose(model.logits(x, plan), model.logits(x, plan, eager=True), atol=1e-5)
    assert sum(counters["recompiles"].values()) == 0 and counters["stats"]["unique_graphs"] == 1


def test_config_validates_the_new_knobs():
    with pytest.raises(train_gpt.ConfigError, match="GATE_WINDOW=40"):
        cfg_of(GATE_WINDOW=40)
    with pytest.raises(train_gpt.ConfigError, match="MUON_NS"):
        cfg_of(MUON_NS="cubic")


def flash_attn_stand_in(monkeypatch, returns_lse: bool = False) -> list:
    """A module flash_attn_interface whose flash_attn_func is SDPA on FA3's (B, T, H, D) layout (as the GPU-less
    shim of shared/bench); it records each call's shapes, dtype and causal flag, in the list returned."""
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append((tuple(q.shape), tuple(k.shape), q.dtype, causal))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                           enable_gqa=k.size(2) != q.size(2)).transpose(1, 2).contiguous()
        return (y, torch.zeros(q.shape[:3])) if returns_lse else y

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
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
                                               (dict(COMPILE=0), "cuda", "sdpa"),
                                               (dict(DOC_MASK=1), "cuda", "flex_attention")])
def test_flash_attention_is_not_called_when_ruled_out(monkeypatch, env, device, name):
    """ATTN_BACKEND=sdpa, the CPU, eager runs and DOC_MASK=1 (flex_attention) keep their kernels: nothing calls FA3."""
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
