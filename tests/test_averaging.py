"""EMA and SWA of the weights: time constants as run fractions, full depth only, fp32."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import PLAIN_SHAPE, final_summary, run_script, tiny_env
from train_gpt import GPT, ConfigError, WeightAverages, build_config, dequantize_state, unpack_artifact


def tiny(**env):
    base = {**PLAIN_SHAPE, "VOCAB_SIZE": "64", "MODEL_DIM": "16", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "8",
            "TRAIN_BATCH_TOKENS": "64", "NUM_LAYERS": "2"}
    return build_config({**base, **{k: str(v) for k, v in env.items()}})


def fill(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_decays_by_run_fraction_not_steps():
    cfg = tiny(EMA_HORIZON=0.2, EXPORT_WEIGHTS="ema")
    model = GPT(cfg)
    averages = WeightAverages(cfg, model)
    fill(model, 1.0)
    averages.update(step=1, t=0.1, full_depth=True)  # starts the average
    fill(model, 3.0)
    averages.update(step=2, t=0.15, full_depth=True)  # dt = 0.05
    expected = 1.0 + 2.0 * (1 - math.exp(-0.05 / 0.2))
    assert all(torch.allclose(e, torch.full_like(e, expected)) for e in averages.ema)
    assert averages.export_into_model().startswith("ema")
    assert all(torch.allclose(p, torch.full_like(p, expected)) for p in model.parameters())


def test_swa_averages_full_depth_snapshots_from_its_start():
    cfg = tiny(SWA_START=0.5, SWA_EVERY=2, EXPORT_WEIGHTS="swa")
    model = GPT(cfg)
    averages = WeightAverages(cfg, model)
    for step, (t, value, full) in enumerate([(0.4, 9.0, True), (0.5, 1.0, True), (0.6, 7.0, True),
                                             (0.7, 3.0, True), (0.8, 5.0, False), (0.9, 8.0, True)], start=1):
        fill(model, value)
        averages.update(step, t, full)
    # taken: step 2 (t=0.5, 1.0), step 4 (3.0), step 6 (8.0); step 5 was not at full depth
    assert averages.swa_count == 3
    averages.export_into_model()
    assert all(torch.allclose(p, torch.full_like(p, 4.0)) for p in model.parameters())


def test_last_weights_when_no_average_was_taken():
    cfg = tiny(SWA_START=0.9, EXPORT_WEIGHTS="swa")
    model = GPT(cfg)
    fill(model, 2.0)
    averages = WeightAverages(cfg, model)
    averages.update(1, 0.5, True)
    assert averages.export_into_model().startswith("last")
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in model.parameters())


@pytest.mark.parametrize("env", [dict(EXPORT_WEIGHTS="ema", EMA_HORIZON=0), dict(EXPORT_WEIGHTS="swa"),
                                 dict(EMA_HORIZON=2)])
def test_inconsistent_averaging_settings_are_refused(env):
    with pytest.raises(ConfigError):
        tiny(**env)


def test_run_exports_the_ema_and_says_so(small_data, tmp_path):
    """The artifact holds the EMA of the weights (to int8's rounding), not the last ones; the float checkpoint keeps
    both."""
    result = run_script(tiny_env(small_data, RUN_ID="ema", EMA_HORIZON=0.1, EXPORT_WEIGHTS="ema"), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "export_weights:ema (horizon 0.1)" in result.stdout
    assert "averaged_weights val_loss:" in result.stdout
    assert final_summary(result.stdout)["steps"] == 30
    run = tmp_path / "runs" / "ema"
    weights = torch.load(run / "final_model.float.pt")
    exported = dequantize_state(unpack_artifact((run / "final_model.int8_brotli.ptz").read_bytes(), "a.ptz")[0])
    assert set(exported) == set(weights["ema"]) == set(weights["last"])
    for name, tensor in exported.items():
        ema, last = weights["ema"][name].float(), weights["last"][name].float()
        apart = (ema - last).abs().max()  # 30 steps at EMA_HORIZON=0.1: ~5e-3; int8 rounding: ~1e-4
        assert apart > 0 and (tensor.float() - ema).abs().max() < apart / 4, name
