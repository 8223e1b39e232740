"""PARALLEL_LANES_START (issue 14): from a physical block on, two residual lanes, as the 2026-04-27 record's parallel
decoder: attention reads lane 0 (mixed with x0), the MLP lane 1 alone; lane j becomes r[j] * lane j + p[0, j] *
attention + p[1, j] * MLP, per row learned (GPT.lane_mix = (r, p[0], p[1])); U-Net skips and loop embeddings go to
lane 0; the final hidden state is the lanes' mean."""
from __future__ import annotations

import pytest
import torch

from conftest import PLAIN_SHAPE, tokenizer_path, trained_like

from train_gpt import (GPT, Blocks, ConfigError, build_config, build_optimizers, config_for_artifact, dequantize_state,
                       export_recipe, model_meta, pack_artifact, plan_for, quantize_state, rms_norm, rotary_tables,
                       unpack_artifact)

VOCAB, T = 128, 16


def cfg_of(**env):
    base = dict(PLAIN_SHAPE, VOCAB_SIZE=VOCAB, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=6,
                TRAIN_SEQ_LEN=T, TRAIN_BATCH_TOKENS=2 * T)
    return build_config({k: str(v) for k, v in {**base, **env}.items()})


def reference_hidden(model: GPT, plan, ids: torch.Tensor) -> torch.Tensor:
    """GPT.hidden written out from the equations, with the blocks' own attention and MLP (SMEAR_GATE=0)."""
    cfg = model.cfg
    x = rms_norm(model.tok_emb(ids))
    x0, stored, lane1 = x, {}, None
    rope = rotary_tables(ids.size(1), cfg.rope_dims or cfg.model_dim // cfg.num_heads, cfg.rope_base, "cpu")
    for v, layer in enumerate(plan.layers):
        block, r, scale = model.blocks[layer.block], layer.row, torch.tensor(layer.norm_scale)
        if layer.lanes and lane1 is None:
            lane1 = x.clone()  # the split: both lanes start as the stream
        if layer.skip_from >= 0:  # to lane 0 (the stream itself before the split)
            skip = model.skip_weight[layer.skip_slot] * stored.pop(layer.skip_from)
            x = torch.lerp(skip, x, torch.sigmoid(model.skip_gate[layer.skip_slot]))
        if model.loop_emb is not None:
            x = x + model.loop_emb[v]
        mixed = model.resid_mix[r][0] * x + model.resid_mix[r][1] * x0
        a = model.attn_scale[r] * block.attn(rms_norm(mixed) * scale, rope, torch.tensor(float(layer.xsa)))
        if layer.lanes:
            m = model.mlp_scale[r] * block.mlp(rms_norm(lane1) * scale)
            resid, p = model.lane_mix[r][0], model.lane_mix[r][1:]
            x, lane1 = resid[0] * x + p[0, 0] * a + p[1, 0] * m, resid[1] * lane1 + p[0, 1] * a + p[1, 1] * m
        else:
            mlp_in = mixed if layer.parallel else mixed + a
            x = mixed + a + model.mlp_scale[r] * block.mlp(rms_norm(mlp_in) * scale)
        if layer.store:
            stored[v] = x  # a lane layer stores lane 0
    return rms_norm(x if lane1 is None else 0.5 * (x + lane1))


# (lanes from the last two of 6 blocks; from block 1, whose layers store U-Net skips; covering a looped core, with
# loop embeddings and a row per virtual layer)
SHAPES = [dict(PARALLEL_LANES_START=4, PARALLEL_RESIDUAL_START=3),
          dict(PARALLEL_LANES_START=1, NUM_LAYERS=4),
          dict(PARALLEL_LANES_START=1, NUM_UNIQUE_LAYERS=5, LOOP_START=1, LOOP_END=2, NUM_LAYERS=7, LOOP_EMBED=1,
               LAYER_ROWS="virtual", PROG_DEPTH="0.5:1,1.0:2")]


def test_on_by_default_from_block_8_after_the_looped_core_as_the_record():
    cfg = build_config({})
    assert cfg.parallel_lanes_start == 8 and cfg.core_last < 8 < cfg.unique_blocks
    assert [layer.block for layer in plan_for(cfg, cfg.repeats).layers if layer.lanes] == list(range(8, 11))


@pytest.mark.parametrize("start", [-1, 6])  # off, or past the last of the 6 blocks (a smaller model's default)
def test_off_adds_no_parameter_and_runs_the_one_stream_equations_bit_for_bit(start):
    cfg = cfg_of(PARALLEL_RESIDUAL_START=3, PARALLEL_LANES_START=start)
    model, plan = trained_like(cfg), plan_for(cfg, cfg.repeats)
    lanes = trained_like(cfg_of(PARALLEL_RESIDUAL_START=3, PARALLEL_LANES_START=4))
    assert set(lanes.state_dict()) - set(model.state_dict()) == {"lane_mix"}
    assert not any("lane" in name for name in model.state_dict()) and not any(layer.lanes for layer in plan.layers)
    x = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert torch.equal(model.hidden(x, plan), reference_hidden(model, plan, x))


@pytest.mark.parametrize("shape", SHAPES)
def test_lanes_compute_the_equations_in_every_plan(shape):
    cfg = cfg_of(**shape)
    model, x = trained_like(cfg), torch.randint(0, VOCAB, (2, T))
    assert model.lane_mix.shape == (model.attn_scale.size(0), 3, 2)  # a row per block or virtual layer
    with torch.no_grad():
        for passes in {passes for _, passes in cfg.depth_phases}:
            plan = plan_for(cfg, passes)
            lanes = [layer.lanes for layer in plan.layers]
            assert lanes == [b >= cfg.parallel_lanes_start for b in plan.blocks] and lanes == sorted(lanes)
            assert torch.equal(model.hidden(x, plan), reference_hidden(model, plan, x))  # the same ops, in order


def test_lanes_init_as_the_record():
    """Residual weights 1.1, the outputs' shares 1: at init both lanes take attention and MLP whole."""
    weights = GPT(cfg_of(PARALLEL_LANES_START=4)).lane_mix
    assert torch.equal(weights[:, 0], torch.full((6, 2), 1.1)) and torch.equal(weights[:, 1:], torch.ones(6, 2, 2))


def mlp_inputs(model: GPT, plan, x: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone())) for b in model.blocks]
    with torch.no_grad():
        model.hidden(x, plan)
    for hook in hooks:
        hook.remove()
    return seen


def test_the_mlp_of_a_lane_layer_reads_lane_1_alone():
    """Scaling block 4's attention output: its own MLP input stays (one stream: it changes); with p[0, 1] = 0 (no
    attention into lane 1: lane_mix[4, 1, 1]) block 5's MLP input stays too, while with p[0, 1] != 0 it changes."""
    cfg = cfg_of(PARALLEL_LANES_START=4, PARALLEL_RESIDUAL_START=-1, LAYER_ROWS="block")
    model, plan, x = trained_like(cfg), plan_for(cfg, cfg.repeats), torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        model.lane_mix[4, 1, 1] = 0.0
    before = mlp_inputs(model, plan, x)
    with torch.no_grad():
        model.attn_scale[4] *= 3.0
    after = mlp_inputs(model, plan, x)
    assert torch.equal(before[4], after[4]) and torch.equal(before[5], after[5])
    with torch.no_grad():
        model.lane_mix[4, 1, 1] = 0.5
    assert not torch.allclose(mlp_inputs(model, plan, x)[5], after[5])
    plain_cfg = cfg_of(PARALLEL_RESIDUAL_START=-1, LAYER_ROWS="block")
    plain, plain_plan = trained_like(plain_cfg), plan_for(plain_cfg, plain_cfg.repeats)
    before = mlp_inputs(plain, plain_plan, x)
    with torch.no_grad():
        plain.attn_scale[4] *= 3.0
    assert not torch.allclose(mlp_inputs(plain, plain_plan, x)[4], before[4])  # one stream: the MLP reads x + a


def test_a_training_step_moves_the_lane_lambdas_through_adam_with_the_scalars():
    cfg = cfg_of(PARALLEL_LANES_START=4)
    model, plan = trained_like(cfg), plan_for(cfg, cfg.repeats)
    adam, muon = build_optimizers(cfg, model, 0, 1, fused=False)
    scalars = adam.param_groups[1]
    assert scalars["lr"] == cfg.scalar_lr and scalars["weight_decay"] == cfg.adam_wd
    assert id(model.lane_mix) in {id(p) for p in scalars["params"]}
    assert id(model.lane_mix) not in {id(p) for g in muon.param_groups for p in g["params"]}
    before = model.lane_mix.detach().clone()
    x, y = torch.randint(0, VOCAB, (2, T)), torch.randint(0, VOCAB, (2, T))
    model(x, y, plan).backward()
    grad = model.lane_mix.grad
    assert grad[4:].abs().min() > 0 and grad[:4].abs().max() == 0  # every weight of the lane layers' rows, only those
    adam.step()
    assert (model.lane_mix[4:] != before[4:]).all()
    assert torch.equal(model.lane_mix[:4], before[:4] * (1 - cfg.scalar_lr * cfg.adam_wd))  # weight decay alone


@pytest.mark.parametrize("env, words", [
    (dict(PARALLEL_LANES_START=-2), "must be -1 or >= 0"),
    # core 1..3 run twice: 0 1 2 3 1 2 3 4; lanes from block 2 would merge back at the second pass's block 1
    (dict(NUM_UNIQUE_LAYERS=5, LOOP_START=1, LOOP_END=3, NUM_LAYERS=8, PARALLEL_LANES_START=2), "run 2 times"),
    # the same in a progressive phase only, and at evaluation only (EVAL_REPEATS)
    (dict(NUM_UNIQUE_LAYERS=5, LOOP_START=1, LOOP_END=3, NUM_LAYERS=5, PARALLEL_LANES_START=3,
          PROG_DEPTH="0.5:2,1.0:1"), "run 2 times"),
    (dict(NUM_UNIQUE_LAYERS=5, LOOP_START=1, LOOP_END=3, NUM_LAYERS=5, PARALLEL_LANES_START=3, EVAL_REPEATS=2),
     "run 2 times")])
def test_bad_lane_starts_are_one_line_errors_naming_the_variable(env, words):
    with pytest.raises(ConfigError, match="PARALLEL_LANES_START") as error:
        cfg_of(**env)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("start", [1, 4])
def test_lanes_may_cover_a_looped_core_or_start_after_it(start):
    cfg = cfg_of(NUM_UNIQUE_LAYERS=5, LOOP_START=1, LOOP_END=3, NUM_LAYERS=8, PARALLEL_LANES_START=start)
    assert [layer.lanes for layer in plan_for(cfg, 2).layers] == [False] + [start == 1] * 6 + [True]


def test_captured_lane_blocks_match_eager_and_capture_once():
    """A block is a lane block in every plan, so its compiled twin keeps one signature (dynamo's eager backend:
    capture and guards as on the GPU, without inductor's compile time)."""
    from torch._dynamo.utils import counters

    cfg = cfg_of(**SHAPES[2])
    model, x = trained_like(cfg), torch.randint(0, VOCAB, (2, T))
    torch._dynamo.reset()
    counters.clear()
    model.compiled_blocks = [torch.compile(b, backend="eager", fullgraph=True, dynamic=False) for b in model.blocks]
    with torch.no_grad():
        for passes in (1, 2, 1):
            plan = plan_for(cfg, passes)
            assert torch.equal(model.hidden(x, plan), model.hidden(x, plan, Blocks.EAGER))
    # one stream (the first layer: its input is x0 itself, which dynamo guards on), and the lanes
    assert sum(counters["recompiles"].values()) == 0 and counters["stats"]["unique_graphs"] <= 2


@pytest.mark.slow  # inductor's CPU compile: ~20 s
def test_compiled_lane_blocks_match_eager_and_compile_once():
    """A block is a lane block in every plan, so its compiled twin keeps one signature: the progressive run's two
    plans compile nothing twice, and loss and gradients (the lane lambdas' too) are eager's to rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = cfg_of(**SHAPES[2])
    eager, x, y = trained_like(cfg), torch.randint(0, VOCAB, (2, T)), torch.randint(0, VOCAB, (2, T))
    compiled = GPT(cfg, compile=True)
    compiled.load_state_dict(eager.state_dict())
    for passes in (1, 2, 1):
        plan = plan_for(cfg, passes)
        for model in (eager, compiled):
            model.zero_grad()
            model(x, y, plan).backward()
        assert torch.allclose(eager(x, y, plan), compiled(x, y, plan), rtol=1e-5, atol=1e-5)
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            assert torch.allclose(pe.grad, pc.grad, rtol=1e-4, atol=1e-6), name
    # the first layer's block (not a lane block), the lane blocks, the loss head, the embedding's smear and norm, the
    # skip mix (twice: the innermost skip is the stream itself), the final norm, the sum of x0's gradients per depth
    assert sum(counters["recompiles"].values()) == 0 and counters["stats"]["unique_graphs"] <= 9


def test_the_artifact_carries_the_lanes_and_scores_as_the_weights_it_holds():
    cfg = cfg_of(**SHAPES[0], TOKENIZER_PATH=tokenizer_path(1024))
    model, plan, x = trained_like(cfg), plan_for(cfg, cfg.repeats), torch.randint(0, VOCAB, (2, T))
    recipe = export_recipe(cfg)
    stored = quantize_state(model.state_dict(), recipe)
    assert stored["lane_mix"].bits == 0 and stored["lane_mix"].values.dtype == torch.float16  # kept whole
    state, _ = unpack_artifact(pack_artifact(stored, recipe), "a.ptz")
    # EVAL_ONLY rebuilds the model from the artifact's settings, even when this run's lack PARALLEL_LANES_START
    back = config_for_artifact(cfg_of(PARALLEL_RESIDUAL_START=3, TOKENIZER_PATH=tokenizer_path(1024)),
                               model_meta(cfg), "a.ptz")
    assert back.parallel_lanes_start == 4
    reloaded = GPT(back)
    reloaded.load_state_dict(dequantize_state(state), strict=True)
    assert torch.equal(reloaded.lane_mix, model.lane_mix.detach().half().float())
    expected = GPT(cfg)
    expected.load_state_dict(dequantize_state(quantize_state(model.state_dict(), recipe)))
    with torch.no_grad():
        assert torch.equal(reloaded.logits(x, plan), expected.logits(x, plan))
        assert (reloaded.logits(x, plan) - model.logits(x, plan)).abs().max() < 0.05  # int8/int6 rounding only


def test_an_artifact_written_before_the_lanes_and_smear_knobs_reloads_without_them():
    cfg = cfg_of(TOKENIZER_PATH=tokenizer_path(1024), PARALLEL_LANES_START=-1)
    meta = model_meta(cfg)
    for knob in ("parallel_lanes_start", "smear_gate", "doc_mask"):
        del meta["model"][knob]  # as an artifact written before these knobs
    now = cfg_of(TOKENIZER_PATH=tokenizer_path(1024), PARALLEL_LANES_START=2, SMEAR_GATE=1, DOC_MASK=1)
    back = config_for_artifact(now, meta, "old.ptz")
    assert (back.parallel_lanes_start, back.smear_gate, back.doc_mask) == (-1, False, False)
    GPT(back).load_state_dict(GPT(cfg).state_dict(), strict=True)
    assert config_for_artifact(now, {}, "bare.ptz").parallel_lanes_start == 2  # no model settings: this run's


@pytest.mark.parametrize("adapter, phases", [("sgd", ""), ("lora", "3")])
def test_score_first_ttt_with_lanes_leaves_every_earlier_score_alone(adapter, phases):
    from test_lora import scores, setup  # its 7-document split, scored as evaluate scores it

    cfg, model, tokens, tables = setup(PARALLEL_LANES_START=1, TTT_ADAPTER=adapter, TTT_PHASES=phases)
    assert model.lane_mix is not None
    _, base = scores(cfg, model, tokens, tables, adapter)
    changed = tokens.clone()
    changed[120] = (tokens[120] + 1) % cfg.vocab_size
    _, after = scores(cfg, model, changed, tables, adapter)
    assert torch.equal(after[:119], base[:119]) and not torch.equal(after[119:], base[119:])
