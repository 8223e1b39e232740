"""Score-first test-time training: every score comes from weights that saw only scored tokens."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import train_gpt
from test_model import tiny_cfg
from train_gpt import GPT, ByteTables, evaluate, plan_for

WINDOW, STRIDE, CHUNK = 16, 4, 48


def setup(**env):
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"TTT_LR": 0.5, "TTT_CHUNK": CHUNK, "TTT_EPOCHS": 2, "TRAIN_SEQ_LEN": WINDOW, **env})
    model = GPT(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (301,), dtype=torch.int32)
    tables = ByteTables(torch.ones(cfg.vocab_size, dtype=torch.int16), torch.zeros(cfg.vocab_size, dtype=torch.bool),
                        torch.ones(cfg.vocab_size, dtype=torch.bool))
    return cfg, model, tokens, tables


def scores(cfg, model, tokens, tables, ttt=True):
    nll = torch.full((len(tokens) - 1,), float("nan"))
    result = evaluate(model, plan_for(cfg, cfg.repeats), tokens, cfg, 0, 1, tables, contextlib.nullcontext,
                      WINDOW, STRIDE, "sgd" if ttt else "none", nll)
    return result, nll


@pytest.mark.parametrize("env", [{}, {"TTT_GRAD_CLIP": 0.5}])
def test_perturbing_a_token_changes_no_earlier_score(env):
    cfg, model, tokens, tables = setup(**env)
    _, base = scores(cfg, model, tokens, tables)
    assert not base.isnan().any()  # every target scored
    for t in (5, 60, 150, 299):
        changed = tokens.clone()
        changed[t] = (tokens[t] + 1) % cfg.vocab_size
        _, after = scores(cfg, model, changed, tables)
        # targets 0..t-2 predict tokens 1..t-1: none of them may move
        assert torch.equal(after[:t - 1], base[:t - 1]), t
        assert not torch.equal(after[t - 1:], base[t - 1:])  # the perturbation is seen


def test_first_chunk_is_scored_before_any_update_and_later_ones_adapt():
    cfg, model, tokens, tables = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (loss, bpb), nll = scores(cfg, model, tokens, tables)
    plain = torch.full_like(nll, float("nan"))
    starts, score_from = train_gpt.plan_windows(len(tokens) - 1, WINDOW, STRIDE)
    train_gpt.score_windows(lambda x: model.logits(x, plan_for(cfg, cfg.repeats)), tokens, starts, score_from,
                            WINDOW, 8, tables, plain)
    first_chunk = int((starts + score_from)[(starts + score_from) < CHUNK].max()) + STRIDE
    assert torch.equal(nll[:first_chunk], plain[:first_chunk])
    assert (nll[first_chunk:] - plain[first_chunk:]).abs().max() > 1e-3  # TTT changed later scores
    assert math.isclose(loss, nll.double().mean().item(), rel_tol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights restored


def test_trains_on_each_scored_chunk_once_in_order_but_not_the_last(monkeypatch):
    cfg, model, tokens, tables = setup()
    calls = []
    real = train_gpt.ttt_step
    monkeypatch.setattr(train_gpt, "ttt_step", lambda *a: calls.append((a[4], a[5])) or real(*a))
    scores(cfg, model, tokens, tables)
    starts, score_from = train_gpt.plan_windows(len(tokens) - 1, WINDOW, STRIDE)
    chunks = torch.unique((starts + score_from) // CHUNK)
    assert len(calls) == len(chunks) - 1
    assert calls[0][0] == 0 and all(b == a2 for (_, b), (a2, _) in zip(calls, calls[1:]))  # contiguous, in order
    assert calls[-1][1] < len(tokens) - 1  # the last chunk's targets are never trained on


def test_one_chunk_is_plain_evaluation():
    cfg, model, tokens, tables = setup(TTT_CHUNK=10_000)
    (loss, bpb), _ = scores(cfg, model, tokens, tables)
    plain_loss, plain_bpb = scores(cfg, model, tokens, tables, ttt=False)[0]
    assert math.isclose(loss, plain_loss, rel_tol=1e-9) and math.isclose(bpb, plain_bpb, rel_tol=1e-9)


def test_cosine_ttt_lr_falls_from_ttt_lr_to_zero_over_the_chunks(monkeypatch):
    cfg, model, tokens, tables = setup()
    used = []
    monkeypatch.setattr(train_gpt, "ttt_step", lambda fn, params, opt, *a: used.append(opt.param_groups[0]["lr"]))
    scores(cfg, model, tokens, tables)
    chunks = math.ceil((len(tokens) - 1) / CHUNK)
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * i / (chunks - 1))) for i in range(chunks - 1)]  # the last: none
    assert used == pytest.approx(expected)
