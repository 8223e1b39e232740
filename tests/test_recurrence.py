"""Depth recurrence: progressive depth, partial looping, the extras, and the README recipes."""
from __future__ import annotations

import re
import shlex

import pytest
import torch

from conftest import PLAIN_SHAPE, ROOT, final_summary, run_script, tiny_env
from train_gpt import (GPT, ConfigError, build_config, depth_phase, max_depth, parse_prog_depth, plan_for,
                       training_repeats, unet_pairs)


def test_prog_depth_parses_and_schedules():
    cfg = build_config({**PLAIN_SHAPE, "NUM_UNIQUE_LAYERS": "3", "NUM_LAYERS": "12", "PROG_DEPTH": "0.4:2,0.65:3,1.0:4"})
    assert parse_prog_depth(cfg.prog_depth) == [(0.4, 2), (0.65, 3), (1.0, 4)]
    assert [depth_phase(cfg, t) for t in (0.0, 0.39, 0.4, 0.64, 0.65, 0.99, 1.0)] == [2, 2, 3, 3, 4, 4, 4]
    assert training_repeats(cfg) == [2, 3, 4] and max_depth(cfg) == 12
    deeper = build_config({**PLAIN_SHAPE, "NUM_UNIQUE_LAYERS": "3", "NUM_LAYERS": "9", "EVAL_REPEATS": "5"})
    assert max_depth(deeper) == 15 and training_repeats(deeper) == [3]


@pytest.mark.parametrize("text", ["0.5:2", "0.5:2,0.4:3,1.0:3", "a:b", "0.5:0,1.0:3", "0:1,1.0:3", "0.5:2,1.0:4"])
def test_bad_prog_depth_names_the_variable(text):
    with pytest.raises(ConfigError, match="PROG_DEPTH"):
        build_config({**PLAIN_SHAPE, "NUM_UNIQUE_LAYERS": "3", "NUM_LAYERS": "9", "PROG_DEPTH": text})


PLANS = [
    dict(NUM_UNIQUE_LAYERS=1, NUM_LAYERS=1),
    dict(NUM_UNIQUE_LAYERS=1, NUM_LAYERS=5, PROG_DEPTH="0.5:1,1.0:5"),
    dict(NUM_UNIQUE_LAYERS=3, NUM_LAYERS=12, PROG_DEPTH="0.4:2,0.65:3,1.0:4", XSA_LAST_N=4, LOOP_EMBED=1),
    dict(NUM_UNIQUE_LAYERS=6, NUM_LAYERS=10, LOOP_START=2, LOOP_END=3, PROG_DEPTH="0.35:1,1.0:3"),
    dict(NUM_UNIQUE_LAYERS=4, NUM_LAYERS=7, LOOP_START=3, LOOP_END=3),
]


def tiny(env):
    base = {**PLAIN_SHAPE, "VOCAB_SIZE": "64", "MODEL_DIM": "16", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "8",
            "TRAIN_BATCH_TOKENS": "64"}
    return build_config({**base, **{k: str(v) for k, v in env.items()}})


@pytest.mark.parametrize("env", PLANS)
def test_every_phase_touches_every_parameter(env):
    """No phase leaves a parameter without a gradient: DDP needs no find_unused_parameters."""
    torch.manual_seed(0)
    cfg = tiny(env)
    model = GPT(cfg)
    for passes in training_repeats(cfg) + [cfg.eval_repeats or cfg.repeats]:
        model.zero_grad(set_to_none=True)
        x = torch.randint(0, 64, (2, 8))
        model(x, x, plan_for(cfg, passes)).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (passes, missing)


@pytest.mark.parametrize("env", PLANS)
def test_unet_pairs_defined_for_every_plan(env):
    cfg = tiny(env)
    for passes in training_repeats(cfg):
        depth = len(plan_for(cfg, passes).blocks)
        assert all(0 <= e < d < depth for e, d in unet_pairs(depth))


def readme_recipes() -> list[dict[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The default is the frontier"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    recipes = []
    for block in blocks:
        words = shlex.split(block.replace("\\\n", " "))
        assert words[-1] == "train_gpt.py" and "torchrun" in words
        recipes.append(dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("--")))
    return recipes


def test_readme_has_the_six_recipes():
    recipes = readme_recipes()
    assert len(recipes) == 6
    for recipe in recipes:
        build_config(recipe)  # each parses and validates as written


@pytest.mark.parametrize("index", range(6))
def test_readme_recipe_runs_at_tiny_width(index, small_data, tmp_path):
    recipe = readme_recipes()[index]
    heads = int(recipe.get("NUM_HEADS", 8))
    shrink = dict(MODEL_DIM=8 * heads, ITERATIONS=6, WARMUP_STEPS=1, TRAIN_LOG_EVERY=3, TRAIN_SEQ_LEN=64,
                  TRAIN_BATCH_TOKENS=2048, TTT_LR=0)
    result = run_script({**tiny_env(small_data), **recipe, **{k: str(v) for k, v in shrink.items()}}, tmp_path,
                        timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = final_summary(result.stdout)
    assert summary["steps"] == 6 and summary["val_bpb"] < 5
    switches = len(parse_prog_depth(recipe["PROG_DEPTH"])) - 1 if recipe.get("PROG_DEPTH") else 0
    assert result.stdout.count("depth_switch step:") == switches


def test_two_ranks_switch_depth_together_and_stay_identical(small_data, tmp_path):
    env = tiny_env(small_data, NUM_UNIQUE_LAYERS=2, NUM_LAYERS=6, PROG_DEPTH="0.3:1,0.6:2,1.0:3",
                   LOOP_EMBED=1, MICRO_BATCH_TOKENS=512, PARALLEL_LANES_START=0)  # two lanes from block 0, all-reduced
    result = run_script(env, tmp_path, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"parallel_lanes_start": 0' in result.stdout
    switches = re.findall(r"^depth_switch step:(\d+) t:[\d.]+ passes:(\d)->(\d) ranks_agree:(\w+)$", result.stdout, re.M)
    assert switches == [("10", "1", "2", "True"), ("19", "2", "3", "True")]  # t = 9/30 and 18/30
    assert re.search(r"^rank_param_checksum:\S+ ranks_identical:True full_depth_from_step:19$", result.stdout, re.M)
    assert "warmup_step:3/3 passes:3" in result.stdout  # every phase primed before the clock starts
    assert re.search(r"^progressive_depth steps:30 fixed_full_depth_estimate:\d+ gained:-?\d+$", result.stdout, re.M)
