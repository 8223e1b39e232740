"""LoRA test-time training: per-document adapters, reset at each BOS, phases; exactness and causality."""
from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from test_model import tiny_cfg
from train_gpt import GPT, ByteTables, evaluate, plan_for

WINDOW = 32
BOS_AT = [0, 30, 75, 90, 170, 200, 215]  # 7 documents of 240 tokens; document 3 (80 targets) is longer than WINDOW


def setup(**env):
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"NUM_LAYERS": 2, "TTT_LR": 0.05, "TTT_ADAPTER": "lora", "TTT_LORA_RANK": 4,
                      "TTT_LORA_LR": 0.05, "TTT_LORA_CHUNK": 8, "TTT_EPOCHS": 1, "TRAIN_SEQ_LEN": 16, "TTT_CHUNK": 64,
                      "VAL_BATCH_SIZE": 3 * WINDOW, "MIX_ETA": 0, **env})  # LoRA is not mixed
    model = GPT(cfg)
    tokens = torch.randint(2, cfg.vocab_size, (240,), dtype=torch.int32)
    tokens[BOS_AT] = train_gpt.BOS_ID
    tables = ByteTables(torch.randint(0, 4, (cfg.vocab_size,), dtype=torch.int16), torch.rand(cfg.vocab_size) < 0.5,
                        torch.rand(cfg.vocab_size) < 0.1)
    return cfg, model, tokens, tables


@functools.lru_cache(maxsize=None)
def shared(phases: str, lora_lr: float):
    return setup(TTT_PHASES=phases, TTT_LORA_LR=lora_lr)


def setup_once(phases="", lora_lr=0.05):
    """One model and split per setting, shared by the tests: evaluate restores the weights (checked below)."""
    return shared(phases, lora_lr)


def rewrite(tokens, lo, hi, cfg):
    """Document [lo, hi)'s text changed, its BOS and the next document's kept."""
    changed, text = tokens.clone(), (tokens[lo + 1:hi] + 1) % cfg.vocab_size
    changed[lo + 1:hi] = torch.where(text == train_gpt.BOS_ID, 2, text)
    return changed


def scores(cfg, model, tokens, tables, adapter="lora"):
    nll = torch.full((len(tokens) - 1,), float("nan"))
    result = evaluate(model, plan_for(cfg, cfg.repeats), tokens, cfg, 0, 1, tables, contextlib.nullcontext,
                      WINDOW, WINDOW, adapter, nll)
    return result, nll


@functools.lru_cache(maxsize=None)
def unperturbed(phases: str, adapter: str, lora_lr: float):
    return scores(*shared(phases, lora_lr), adapter)


def baseline(phases="", adapter="lora", lora_lr=0.05):
    """The unperturbed scores of a setting, computed once for all the tests that compare against them."""
    return unperturbed(phases, adapter, lora_lr)


def plain_scores(model, cfg, tokens):
    """Target t's loss given its document from its BOS, at most WINDOW tokens: one causal forward per target, as
    a batch of right-padded contexts (padding after the context cannot reach it)."""
    plan, targets = plan_for(cfg, cfg.repeats), len(tokens) - 1
    contexts = torch.zeros(targets, WINDOW, dtype=torch.long)
    last = torch.empty(targets, dtype=torch.long)
    for s, e in train_gpt.document_bounds(tokens):
        for t in range(s, e):
            x = tokens[max(s, t + 1 - WINDOW):t + 1].long()
            contexts[t, :len(x)], last[t] = x, len(x) - 1
    with torch.no_grad():
        logits = model.logits(contexts, plan)[torch.arange(targets), last]
    return F.cross_entropy(logits.float(), tokens[1:].long(), reduction="none")


def test_lr_zero_equals_plain_per_document_scoring_and_counts_every_target_once():
    cfg, model, tokens, tables = setup_once(lora_lr=0.0)
    (loss, bpb), nll = baseline(lora_lr=0.0)
    assert not nll.isnan().any()  # every target scored
    assert torch.allclose(nll, plain_scores(model, cfg, tokens), atol=1e-5)  # as a plain per-document scorer
    x, y = tokens[:-1].long(), tokens[1:].long()
    nbytes = train_gpt.token_bytes(tables, x, y).sum().item()
    assert math.isclose(loss, nll.double().mean().item(), rel_tol=1e-9)  # each target counted once
    assert math.isclose(bpb, nll.double().sum().item() / math.log(2) / nbytes, rel_tol=1e-9)


@pytest.mark.parametrize("adapter", ["none", "sgd", "lora"])
def test_perturbing_a_token_changes_no_earlier_score(adapter):
    phases = "3" if adapter == "lora" else ""  # lora with a global phase too
    cfg, model, tokens, tables = setup_once(phases)
    _, base = baseline(phases, adapter)
    for t in (33, 120, 238):  # in a short document, the long one, the last
        changed = tokens.clone()
        changed[t] = (tokens[t] + 1) % cfg.vocab_size
        _, after = scores(cfg, model, changed, tables, adapter)
        assert torch.equal(after[:t - 1], base[:t - 1]), t  # targets before t - 1 predict tokens before t
        assert not torch.equal(after[t - 1:], base[t - 1:]), t  # the perturbation is seen


def test_adapters_reset_at_each_document_and_train_within_it():
    cfg, model, tokens, tables = setup_once()
    _, base = baseline()
    _, frozen = baseline(adapter="none")
    bounds = train_gpt.document_bounds(tokens)
    s, e = bounds[4]  # a document of 30 targets: 4 chunks
    assert torch.equal(base[s:s + 8], frozen[s:s + 8])  # its first chunk: a fresh adapter is the base model
    assert (base[s + 8:e] - frozen[s + 8:e]).abs().max() > 1e-4  # later chunks: adapted
    for d in (1, 4):  # rewrite document d's text: no other document's loss moves
        lo, hi = bounds[d]
        _, after = scores(cfg, model, rewrite(tokens, lo, hi, cfg), tables)
        outside = torch.ones_like(base, dtype=torch.bool)
        outside[lo:hi] = False
        assert torch.equal(after[outside], base[outside]), d
        assert not torch.equal(after[lo:hi], base[lo:hi]), d


def test_a_phase_changes_only_later_documents():
    cfg, model, tokens, tables = setup_once("3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, base = baseline("3")
    bounds = train_gpt.document_bounds(tokens)
    lo, hi = bounds[1]
    _, after = scores(cfg, model, rewrite(tokens, lo, hi, cfg), tables)
    phase_end = bounds[3][0]
    assert torch.equal(after[:lo], base[:lo]) and torch.equal(after[hi:phase_end], base[hi:phase_end])
    assert (after[phase_end:] - base[phase_end:]).abs().max() > 0  # the phase learned from document 1's text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights restored


def test_only_rows_with_targets_left_are_computed_each_with_its_document_so_far():
    cfg, model, tokens, tables = setup_once()
    shapes, logits = [], model.logits
    model.logits = lambda x, *a, **k: shapes.append(tuple(x.shape)) or logits(x, *a, **k)
    try:
        scores(cfg, model, tokens, tables)
    finally:
        del model.logits
    lengths = sorted((e - s for s, e in train_gpt.document_bounds(tokens)), reverse=True)  # 80, 45, 30, ...
    rows, pow2 = cfg.val_batch_size // WINDOW, lambda n: 2 ** math.ceil(math.log2(n))
    expected = [(min(len(lengths[i:i + rows]), pow2(sum(n > c * 8 for n in lengths[i:i + rows]))),  # live rows
                 min(WINDOW, pow2(8 * (c + 1))))  # chunk 8: the document so far, both rounded up to a power of 2
                for i in range(0, len(lengths), rows) for c in range(math.ceil(lengths[i] / 8))]
    assert shapes == expected
    assert (1, WINDOW) in shapes and lengths[0] > WINDOW  # the first batch ends on its longest document alone


def test_competition_scaling_refuses_on_cuda_only():
    assert train_gpt.competition_seconds(10.0, 40_540_160 // 4, 2, "cuda") == pytest.approx(10.0)
    assert train_gpt.competition_seconds(10.0, 40_540_160, 8, "cpu") == 0.0


def test_compiled_lora_twins_score_as_eager_and_the_budget_check_primes_every_shape():
    """LoRA TTT runs its own compiled twins of the blocks, whose batch and window shapes turn dynamic: after
    check_eval_budget's priming on synthetic tokens, the evaluation (rows 3, 2, 1 as documents end; windows of 8, 16
    and 32 tokens; a phase's SGD steps of 2, 2 and 1 pieces) compiles nothing more, and scores as the eager blocks."""
    from torch._dynamo.utils import counters

    cfg, model, tokens, tables = setup(TRAIN_SEQ_LEN=WINDOW, TTT_PHASES="3", TTT_CHUNK=32)
    eager, eager_nll = scores(cfg, model, tokens, tables)
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.config.cache_size_limit = 64  # as GPT(compile=True) sets it
    # backend "eager": dynamo's graph capture, guards and dynamic shapes as on the GPU, without inductor's compile time
    model.compiled_blocks = [torch.compile(b, backend="eager", fullgraph=True, dynamic=False) for b in model.blocks]
    model.dynamic_blocks = [torch.compile(b, backend="eager", fullgraph=True, dynamic=None) for b in model.blocks]
    train_gpt.check_eval_budget(model, cfg, train_gpt.Runtime(0, 1, 0, torch.device("cpu")),
                                train_gpt.document_bounds(tokens))
    primed = counters["stats"]["unique_graphs"]
    assert primed >= 3  # the forward's, LoRA's for one row and for several
    compiled, nll = scores(cfg, model, tokens, tables)
    assert counters["stats"]["unique_graphs"] == primed
    assert compiled == pytest.approx(eager, rel=1e-6) and torch.allclose(nll, eager_nll, atol=1e-5)


def budget_lines(cfg, model, tokens) -> list[str]:
    logged = []
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"))
    rt.log = logged.append
    train_gpt.check_eval_budget(model, cfg, rt, train_gpt.document_bounds(tokens))
    return logged


@pytest.mark.parametrize("adapter, phases", [("sgd", ""), ("lora", "3")])
def test_the_budget_check_runs_ttt_steps_and_leaves_the_weights_as_they_were(adapter, phases):
    """check_eval_budget runs TTT's SGD step (at LR 0) and LoRA's chunk steps on synthetic tokens (priming their
    compiled graphs): afterwards every weight is bit-equal and trainable again."""
    cfg, model, tokens, tables = setup(TTT_ADAPTER=adapter, TTT_PHASES=phases, TTT_CHUNK=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget_lines(cfg, model, tokens)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("adapter, phases, expected", [("sgd", "", "ttt:10.0s"), ("lora", "3", "ttt_lora:19.0s")])
def test_the_budget_estimate_counts_the_steps_evaluate_takes(monkeypatch, adapter, phases, expected):
    """A LoRA chunk step timed at 1 s (lora_batch: 1 s a step), anything else 1 s: sgd = 7 SGD steps (239 targets in
    chunks of 32, the last untrained) + 3 batches of 6 windows; lora = the phase's 3 SGD steps (90 targets before
    document 3) + 16 chunk steps of 8 targets, documents 0-2 then 3-6 batched apart as the phase divides them (their
    longest 45 and 80 targets: 6 + 10; one batch of all 7 would take 10)."""
    monkeypatch.setattr(train_gpt, "timed", lambda rt, fn, *args: len(args[5]) if fn is train_gpt.lora_batch else 1.0)
    cfg, model, tokens, tables = setup(TTT_ADAPTER=adapter, TTT_PHASES=phases, TTT_CHUNK=32)
    estimate = next(line for line in budget_lines(cfg, model, tokens) if line.startswith("eval_budget_estimate"))
    assert expected in estimate.split()


def test_every_evaluation_batch_has_a_shape_the_budget_check_primed():
    """The round trip, sliding window and SGD TTT (its chunks of 4 windows, fewer than a batch of 6) pad every batch to
    one shape, and TTT's steps keep theirs: the budget check ran each shape first, so none compiles on validation text."""
    cfg, model, tokens, tables = setup(TTT_ADAPTER="sgd", TTT_CHUNK=32, EVAL_STRIDE=8)
    shapes, logits = [], model.logits
    model.logits = lambda x, *args, **kwargs: shapes.append(tuple(x.shape)) or logits(x, *args, **kwargs)
    budget_lines(cfg, model, tokens)
    primed = set(shapes)
    shapes.clear()
    for kind, window, stride, adapter in train_gpt.evaluation_windows(cfg):
        evaluate(model, plan_for(cfg, cfg.repeats), tokens, cfg, 0, 1, tables, contextlib.nullcontext, window, stride,
                 adapter)
    assert set(shapes) == primed == {(6, 16), (2, 16)}  # 6 windows of 16 tokens; 2 sequences of 16 per TTT step


def mixed_scores(cfg, model, tokens, tables, adapter):
    nll = torch.full((len(tokens) - 1,), float("nan"))
    evaluate(model, plan_for(cfg, cfg.repeats), tokens, cfg, 0, 1, tables, contextlib.nullcontext, WINDOW, WINDOW // 2,
             adapter, nll, mixer=train_gpt.NgramMixer(cfg, tokens.device))
    return nll


@pytest.mark.parametrize("adapter", ["none", "sgd", "lora", "none+mixer", "sgd+mixer"])
@pytest.mark.parametrize("t", [150, 228])  # cuts document 3 inside its last chunk; the last document
def test_a_later_token_turned_into_a_bos_moves_no_earlier_score(adapter, t):
    """The strict reading of causality: p_t depends only on the artifact and x_1..x_{t-1}, so nothing about later
    tokens, not even where the current document ends, may shape an earlier score. Turning token t into a BOS (a new
    document boundary) leaves every target before t - 1 as it was, up to rounding (LoRA batches documents of similar
    length: a new boundary regroups rows, and a batch's shape moves float sums by ~1e-6)."""
    phases = "3" if adapter == "lora" else ""
    cfg, model, tokens, tables = setup_once(phases)
    cut = tokens.clone()
    cut[t] = train_gpt.BOS_ID
    if adapter.endswith("+mixer"):
        before, after = (mixed_scores(cfg, model, x, tables, adapter.split("+")[0]) for x in (tokens, cut))
    else:
        before, after = scores(cfg, model, tokens, tables, adapter)[1], scores(cfg, model, cut, tables, adapter)[1]
    assert (after[: t - 1] - before[: t - 1]).abs().max() < 1e-5, adapter
    assert not torch.equal(after[t - 1 :], before[t - 1 :])  # the boundary is seen from t - 1 on
