"""The n-gram mixer: normalized mixtures, counts of scored targets only, causal scores, weights that learn."""
from __future__ import annotations

import contextlib
import math
import re
import time

import pytest
import torch

import train_gpt
from test_model import tiny_cfg
from test_ttt import STRIDE, WINDOW, setup
from train_gpt import ConfigError, NgramMixer, evaluate, evaluation_windows, plan_for, plan_windows, score_windows


def mixer_for(**env):
    return NgramMixer(tiny_cfg(**{"MIX_ETA": 1, **env}), "cpu")


def skewed_stream(n, vocab, seed=0):
    """Tokens with bigram structure: each token mostly followed by one of a few successors."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=g)
    tokens = [0]
    for _ in range(n - 1):
        tokens.append(int(successors[tokens[-1], torch.randint(0, 3, (1,), generator=g)]) if torch.rand(
            1, generator=g) < 0.8 else int(torch.randint(0, vocab, (1,), generator=g)))
    return torch.tensor(tokens, dtype=torch.int32)


def mixture_over_vocabulary(mixer, prev2, prev, logits):
    """p(y) for every y after (prev2, prev), built through mix(): one 3-token stream per candidate y."""
    V = mixer.vocab
    tokens = torch.stack([torch.full((V,), prev2), torch.full((V,), prev), torch.arange(V)], 1).flatten()
    nll = -torch.log_softmax(logits.double(), 0)  # the network's full distribution, float64
    return (-mixer.mix(tokens, torch.arange(V) * 3 + 1, nll)).exp()


def test_each_expert_and_the_mixture_sum_to_one_over_the_vocabulary():
    mixer = mixer_for(MIX_BUCKETS=7)  # few buckets: trigram contexts collide
    stream = skewed_stream(3000, mixer.vocab)
    for a in range(0, 2999, 700):
        mixer.update(stream, a, min(a + 700, 2999), 1)
    torch.manual_seed(1)
    seen = [(int(stream[i - 1]), int(stream[i])) for i in (5, 900, 2500)]
    for prev2, prev in seen + [(3, 200)]:  # contexts seen, and one perhaps never seen
        logits = 4 * torch.randn(mixer.vocab)
        for k in range(4):  # each expert alone (a one-hot weight), then a mixture
            mixer.log_w = torch.full((4,), -math.inf, dtype=torch.float64)
            mixer.log_w[k] = 0.0
            p = mixture_over_vocabulary(mixer, prev2, prev, logits)
            assert abs(p.sum().item() - 1) < 1e-6 and p.min() > 0, (k, prev2, prev)
        mixer.log_w = torch.randn(4, dtype=torch.float64)
        p = mixture_over_vocabulary(mixer, prev2, prev, logits)
        assert p.dtype == torch.float64 and abs(p.sum().item() - 1) < 1e-6 and p.min() > 0
    assert mixer.tables[2].view(7, -1)[:, :-2].sum(1).tolist() == mixer.tables[2].view(7, -1)[:, -2].tolist()


def test_before_any_count_the_n_gram_experts_are_uniform():
    mixer = mixer_for()
    mixer.log_w = torch.tensor([-math.inf, 0.0, -math.inf, -math.inf], dtype=torch.float64)
    p = mixture_over_vocabulary(mixer, 1, 2, torch.zeros(mixer.vocab))
    assert torch.allclose(p, torch.full_like(p, 1 / mixer.vocab), rtol=1e-12)


def run_with_mixer(cfg, model, tokens, tables, ttt, rank=0, world_size=1):
    """evaluate() with a mixer whose update() records (a, b) and the tables it found at each chunk's start."""
    mixer, calls = NgramMixer(cfg, "cpu"), []
    real = mixer.update

    def update(tokens_, a, b, world_size_):
        calls.append((a, b, [t.clone() for t in mixer.tables]))
        real(tokens_, a, b, world_size_)

    mixer.update = update
    nll = torch.full((len(tokens) - 1,), float("nan"), dtype=torch.float64)
    result = evaluate(model, plan_for(cfg, cfg.repeats), tokens, cfg, rank, world_size, tables, contextlib.nullcontext,
                      WINDOW, STRIDE, "sgd" if ttt else "none", nll, mixer=mixer)
    return result, nll, calls, mixer


def test_counts_at_each_chunk_start_are_those_of_all_targets_before_it_on_every_rank(monkeypatch):
    cfg, model, tokens, tables = setup(MIX_ETA=1, MIX_BUCKETS=5)
    monkeypatch.setattr(train_gpt.dist, "all_reduce", lambda t: None)  # ranks simulated one by one
    runs = [run_with_mixer(cfg, model, tokens, tables, False, rank, 3)[2] for rank in range(3)]
    calls = runs[0]
    assert calls[0][0] == 0 and calls[-1][1] == len(tokens) - 1  # every target counted once, in order
    assert all(b == a2 for (_, b, _), (a2, _, _) in zip(calls, calls[1:])) and len(calls) > 3
    for a, b, found in calls:
        fresh = NgramMixer(cfg, "cpu")
        if a:
            fresh.update(tokens, 0, a, 1)  # all targets before the chunk at once
        assert all(torch.equal(f, t) for f, t in zip(found, fresh.tables)), a
    for other in runs[1:]:  # each rank's state at each chunk's start is the same
        assert [(a, b) for a, b, _ in other] == [(a, b) for a, b, _ in calls]
        assert all(torch.equal(x, y) for (_, _, s), (_, _, t) in zip(other, calls) for x, y in zip(s, t))


@pytest.mark.parametrize("ttt", [False, True])
def test_perturbing_a_token_changes_no_earlier_mixed_score(ttt):
    cfg, model, tokens, tables = setup(MIX_ETA=2, MIX_BUCKETS=5)
    _, base, _, _ = run_with_mixer(cfg, model, tokens, tables, ttt)
    assert not base.isnan().any()
    for t in (60, 299) if ttt else (5, 60, 150, 299):
        changed = tokens.clone()
        changed[t] = (tokens[t] + 1) % cfg.vocab_size
        _, after, _, _ = run_with_mixer(cfg, model, changed, tables, ttt)
        assert torch.equal(after[:t - 1], base[:t - 1]), t  # targets 0..t-2 predict tokens 1..t-1
        assert not torch.equal(after[t - 1:], base[t - 1:])


def test_mixed_scores_count_each_target_once_with_the_same_bytes():
    cfg, model, tokens, tables = setup(MIX_ETA=1)
    tables = tables._replace(base_bytes=torch.randint(0, 5, (cfg.vocab_size,), dtype=torch.int16))
    starts, score_from = plan_windows(len(tokens) - 1, WINDOW, STRIDE)
    logits_fn = partial_logits(model, cfg)
    plain_nll, mixed_nll = (torch.full((len(tokens) - 1,), float("nan"), dtype=torch.float64) for _ in range(2))
    plain = score_windows(logits_fn, tokens, starts, score_from, WINDOW, 7, tables, plain_nll)
    mixed = score_windows(logits_fn, tokens, starts, score_from, WINDOW, 7, tables, mixed_nll, NgramMixer(cfg, "cpu"))
    assert mixed[1] == plain[1] == len(tokens) - 1 and mixed[2] == plain[2]  # tokens and bytes unchanged
    assert not mixed_nll.isnan().any() and math.isclose(mixed[0].item(), mixed_nll.sum().item(), rel_tol=1e-12)
    # one chunk, no counts yet: uniform n-gram experts at weight 0.09 beside the network's 0.91
    expected = -torch.log(0.91 * torch.exp(-plain_nll) + 0.09 / cfg.vocab_size)
    assert torch.allclose(mixed_nll, expected, rtol=1e-5)


def partial_logits(model, cfg):
    return lambda x: model.logits(x, plan_for(cfg, cfg.repeats))


def weights_after(stream, network_nll, chunk=200, eta=1.0):
    mixer = mixer_for(MIX_ETA=eta)
    losses = []
    for a in range(0, len(stream) - 1, chunk):
        b = min(a + chunk, len(stream) - 1)
        losses.append(mixer.mix(stream, torch.arange(a, b), network_nll(a, b)).mean().item())
        mixer.update(stream, a, b, 1)
    return mixer.log_w.softmax(0), losses


def test_weights_move_to_a_perfect_bigram_and_to_a_perfect_network():
    V = 256
    successor = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    stream = [0]
    for _ in range(4000):
        stream.append(int(successor[stream[-1]]))
    stream = torch.tensor(stream, dtype=torch.int32)  # a cycle: each token has one successor
    w, losses = weights_after(stream, lambda a, b: torch.full((b - a,), math.log(V)))  # the network: uniform
    assert w[2] + w[3] > 0.95 and w[2] > 0.03  # the bigram and the trigram (as sure) took over from the network
    assert losses[-1] < 0.2 * losses[0]
    random = torch.randint(0, V, (4001,), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    w, _ = weights_after(random, lambda a, b: torch.full((b - a,), 0.1))  # the network: sure and right
    assert w[0] > 0.99
    w, _ = weights_after(random, lambda a, b: torch.full((b - a,), 0.1), eta=0.0)  # MIX_ETA=0: weights stay
    assert torch.allclose(w, torch.tensor([0.91, 0.03, 0.03, 0.03], dtype=torch.float64))


def test_mixer_knobs_and_evaluation_names():
    with pytest.raises(ConfigError, match="MIX_ETA"):
        tiny_cfg(MIX_ETA=-1)
    with pytest.raises(ConfigError, match="MIX_BUCKETS"):
        tiny_cfg(MIX_BUCKETS=0)
    with pytest.raises(ConfigError, match=r"^MIX_ETA=1: the n-gram mixer does not mix LoRA TTT; set TTT_ADAPTER=sgd"):
        tiny_cfg(TTT_ADAPTER="lora")  # the default MIX_ETA=1: LoRA asks for MIX_ETA=0
    tiny_cfg(MIX_ETA=0, TTT_ADAPTER="lora")  # LoRA without the mixer stays as it was

    def kinds(**env):
        return [(kind, adapter) for kind, _, _, adapter in evaluation_windows(tiny_cfg(**{"EVAL_STRIDE": 4, **env}))]
    assert kinds() == [("roundtrip", "none"), ("sliding", "none"), ("ttt_mix", "sgd")]  # the default: mixed TTT
    assert kinds(TTT_LR=0, MIX_ETA=0) == [("roundtrip", "none"), ("sliding", "none")]
    assert kinds(TTT_LR=0, MIX_ETA=1) == [("roundtrip", "none"), ("sliding_mix", "none")]
    assert kinds(TTT_LR=0.1, MIX_ETA=1) == [("roundtrip", "none"), ("sliding", "none"), ("ttt_mix", "sgd")]
    assert kinds(TTT_LR=0.1, MIX_ETA=1, EVAL_STRIDE=0) == [("roundtrip", "none"), ("ttt_mix", "sgd")]
    assert kinds(TTT_LR=0, MIX_ETA=1, EVAL_STRIDE=0) == [("roundtrip_mix", "none")]  # the only one is the last


def test_the_eval_budget_estimate_times_the_mixer_in_every_batch_of_the_mixed_evaluation(capsys, monkeypatch):
    """A mixer made slow by 100 ms a call: the sliding_mix estimate holds 100 ms for each of its batches (long enough
    that a loaded machine's unmixed forward stays under it)."""
    real = NgramMixer.mix
    monkeypatch.setattr(NgramMixer, "mix", lambda *a: time.sleep(0.1) or real(*a))
    cfg = tiny_cfg(MIX_ETA=1, EVAL_STRIDE=4, TTT_LR=0, MIX_BUCKETS=64, VAL_BATCH_SIZE=256)  # 16 windows a batch
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"))
    train_gpt.check_eval_budget(train_gpt.GPT(cfg), cfg, rt, [(0, 499)])
    line = re.search(r"^eval_budget_estimate roundtrip:([\d.]+)s sliding_mix:([\d.]+)s total:", capsys.readouterr().out,
                     re.M)
    batches = math.ceil(len(plan_windows(499, WINDOW, 4)[0]) / 16)
    assert line and float(line[2]) >= 0.1 * batches > float(line[1]), (line and line[0], batches)
    tight = tiny_cfg(MIX_ETA=1, EVAL_STRIDE=4, TTT_LR=0, VAL_BATCH_SIZE=256, EVAL_BUDGET_S=1e-9)
    with pytest.raises(train_gpt.Refused, match="EVAL_BUDGET_S"):
        train_gpt.check_eval_budget(train_gpt.GPT(tight), tight, rt, [(0, 499)])
