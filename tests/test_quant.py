"""Per-row int8 quantization, packing and the compressed artifact round trip."""
from __future__ import annotations

import torch

from train_gpt import (KEEP_FLOAT_MAX_NUMEL, dequantize_rows, pack_artifact, quantize_rows, quantize_state,
                       unpack_artifact)


def test_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-4, 1, 300)[:, None]  # rows across five decades
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale.float()[:, None] / 2 + 1e-12).all()
    # no floor: a row of tiny weights keeps ~1/254 relative precision, like a large one
    rel = err.amax(dim=1) / w.abs().amax(dim=1)
    assert rel.max() < 1 / 250


def test_zero_and_constant_rows():
    w = torch.zeros(4, 100)
    w[1] = 3.0
    w[2, 7] = -1e-6
    q, scale = quantize_rows(w)
    back = dequantize_rows(q, scale)
    assert torch.equal(back[0], w[0]) and torch.allclose(back[1], w[1], rtol=1e-2)
    assert torch.isfinite(back).all() and (back[2] - w[2]).abs().max() < 1e-7


def test_state_split_and_artifact_round_trip():
    torch.manual_seed(1)
    state = {"big": torch.randn(512, 256), "small": torch.randn(64, 64), "vector": torch.randn(512),
             "ints": torch.arange(10)}
    packed = quantize_state(state)
    assert set(packed["quantized"]) == {"big"}  # 131072 > KEEP_FLOAT_MAX_NUMEL; 4096 is kept in float
    assert 64 * 64 <= KEEP_FLOAT_MAX_NUMEL < 512 * 256
    back = unpack_artifact(pack_artifact(state, level=3))
    assert set(back) == set(state)
    for name in ("small", "vector", "ints"):
        assert torch.equal(back[name], state[name])
    q, scale = quantize_rows(state["big"])
    assert torch.equal(back["big"], dequantize_rows(q, scale))
    assert back["big"].dtype == torch.float32


def test_artifact_is_smaller_than_raw_int8():
    torch.manual_seed(2)
    state = {"w": torch.randn(1024, 512) * 0.02}
    blob = pack_artifact(state, level=22)
    assert len(blob) < 1024 * 512  # zstd squeezes the int8 codes of Gaussian weights below 8 bits
