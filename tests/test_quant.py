"""The export: per-row quantization (std clip), GPTQ, the container, byte shuffling, fitting to the cap."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zlib

import numpy as np
import pytest
import torch

from conftest import PLAIN_SHAPE
from train_gpt import (ARTIFACT_MAGIC, FIT_STEP, KEEP_FLOAT_MAX_NUMEL, ArtifactTooLarge, DataError, build_config,
                       dequantize_rows, dequantize_state, export_recipe, fit_artifact, gptq_quantize, pack_artifact,
                       quantize_rows, quantize_state, shuffle_bytes, unpack_artifact, unshuffle_bytes)


def recipe(**env):
    return export_recipe(build_config({k: str(v) for k, v in env.items()}))


@pytest.fixture(autouse=True)
def fast_zstd(monkeypatch):
    """zstd at level 3 instead of 22 (the codec reads the constant when it runs): the same bytes round trip and the
    fitter's search is the same, in a fraction of the time."""
    import train_gpt

    monkeypatch.setattr(train_gpt, "ZSTD_LEVEL", 3)


def synthetic_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every group quantized (matrices over KEEP_FLOAT_MAX_NUMEL), plus small tensors kept whole."""
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.attn.c_q.weight": 0.02 * torch.randn(256, 288, generator=g),
            "blocks.0.attn.c_k.weight": 0.02 * torch.randn(256, 288, generator=g),
            "blocks.0.mlp.fc.weight": 0.02 * torch.randn(512, 288, generator=g),
            "tok_emb.weight": 0.01 * torch.distributions.StudentT(4.0).sample((512, 288)),
            "blocks.0.attn.q_gain": torch.full((8,), 1.5), "small": torch.randn(64, 64, generator=g),
            "ints": torch.arange(10), "huge": torch.tensor([1e6, -3.0])}


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("sigmas", [3.0, 12.85, 20.0])
def test_std_clip_step_is_k_std_over_qmax_and_error_is_half_a_step_below_the_clip(bits, sigmas):
    torch.manual_seed(bits)
    w = torch.randn(300, 200) * torch.logspace(-4, 1, 300)[:, None]  # rows across five decades
    q, scale = quantize_rows(w, bits, sigmas)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.abs().max() <= qmax
    assert torch.equal(scale, (sigmas * w.std(dim=1) / qmax).to(torch.float16))
    step = scale.float()[:, None]
    inside = w.abs() <= qmax * step
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err[inside] <= step.expand_as(w)[inside] / 2 * (1 + 1e-6)).all()
    assert torch.equal(q[~inside].abs(), torch.full_like(q[~inside], qmax))  # clipped at k sigma
    assert (~inside).any() == (sigmas == 3.0)  # Gaussian rows reach 3 sigma, never 12.85


def test_zero_sigmas_take_the_step_from_the_row_max_and_clip_nothing():
    torch.manual_seed(1)
    w = torch.randn(300, 200) * torch.logspace(-4, 1, 300)[:, None]
    q, scale = quantize_rows(w, 6, 0.0)
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale.float()[:, None] / 2 + 1e-12).all() and q.abs().amax(dim=1).min() == 31
    assert (err.amax(dim=1) / w.abs().amax(dim=1)).max() < 1 / 61  # ~1/62 of each row's max, small rows too


@pytest.mark.parametrize("sigmas", [0.0, 12.85])
def test_zero_and_constant_rows_get_a_positive_step_and_come_back_finite(sigmas):
    w = torch.zeros(4, 100)
    w[1] = 3.0
    w[2, 7] = -1e-6
    q, scale = quantize_rows(w, 8, sigmas)
    back = dequantize_rows(q, scale)
    assert (scale.float() > 0).all() and torch.isfinite(back).all()
    assert torch.equal(back[0], w[0]) and (back[2] - w[2]).abs().max() <= 1e-6
    if sigmas == 0.0:
        assert torch.allclose(back[1], w[1], rtol=1e-2)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float16, np.int16, np.float32, np.int32, np.float64, np.int64])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_shuffle_is_inverted_exactly_for_every_element_size(dtype, n):
    raw = np.random.default_rng(n).integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8)
    a = raw.view(dtype)  # random bytes, NaN payloads included
    data = shuffle_bytes(a)
    assert len(data) == a.nbytes and unshuffle_bytes(data, np.dtype(dtype).name).tobytes() == a.tobytes()
    if a.itemsize > 1 and n:  # byte planes: every element's low byte first
        assert data[:n] == raw.reshape(n, a.itemsize)[:, 0].tobytes()


@pytest.mark.parametrize("compressor", ["brotli", "zstd"])
def test_container_returns_every_tensor_bit_exact(compressor):
    pytest.importorskip("brotli") if compressor == "brotli" else None
    state = synthetic_state()
    r = dataclasses.replace(recipe(COMPRESSOR=compressor, MATRIX_CLIP_SIGMAS=8), streams=3)
    stored = quantize_state(state, r)
    back, r_back = unpack_artifact(pack_artifact(stored, r), "test.ptz")
    assert r_back == r and list(back) == list(state)
    for name, s in stored.items():
        b = back[name]
        assert (b.dtype, b.bits, b.values.dtype, b.values.shape) == (s.dtype, s.bits, s.values.dtype, s.values.shape)
        assert torch.equal(b.values, s.values) and (s.scale is None) == (b.scale is None)
        assert s.scale is None or torch.equal(b.scale, s.scale)
    assert {n for n, s in stored.items() if s.bits} == {n for n in state if state[n].numel() > KEEP_FLOAT_MAX_NUMEL}
    widths = [stored[n].bits for n in ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight")]
    assert widths == [6, 6, 8]
    assert stored["small"].values.dtype == torch.float16 and stored["huge"].values.dtype == torch.float32  # 1e6 > fp16
    restored = dequantize_state(back)
    assert torch.equal(restored["ints"], state["ints"]) and torch.equal(restored["huge"], state["huge"])
    assert all(restored[n].dtype == state[n].dtype and restored[n].shape == state[n].shape for n in state)
    q, scale = quantize_rows(state["blocks.0.mlp.fc.weight"], 6, 8.0)  # MATRIX_CLIP_SIGMAS: the MLP's k too
    assert torch.equal(restored["blocks.0.mlp.fc.weight"], dequantize_rows(q, scale))


def rebuild(blob: bytes, edit) -> bytes:
    """The container with its header passed through `edit` (the payload and its checksum unchanged)."""
    end = 9 + int.from_bytes(blob[5:9], "little")
    header = edit(json.loads(zlib.decompress(blob[9:end])))
    head = zlib.compress(json.dumps(header).encode())
    return blob[:5] + len(head).to_bytes(4, "little") + head + blob[end:]


def test_loading_refuses_a_bad_magic_version_recipe_or_checksum_naming_the_file():
    r = recipe(COMPRESSOR="zstd")
    blob = pack_artifact(quantize_state(synthetic_state(), r), r)
    flipped = bytearray(blob)
    flipped[-100] ^= 1
    wrong_codec = rebuild(blob, lambda h: {**h, "recipe": {**h["recipe"], "compressor": "zip"}})
    wrong_bits = rebuild(blob, lambda h: {**h, "recipe": {**h["recipe"], "attn": {**h["recipe"]["attn"], "bits": 3}}})
    cases = [(bytes(flipped), "checksum"), (b"PGBR" + blob[4:], "magic"), (blob[:4] + b"\x07" + blob[5:], "version"),
             (wrong_codec, "recipe"), (wrong_bits, "recipe"), (blob[:-10], "checksum"), (b"", "magic")]
    for bad, culprit in cases:
        with pytest.raises(DataError, match=culprit) as info:
            unpack_artifact(bad, "runs/x/final_model.ptz")
        assert str(info.value).startswith("runs/x/final_model.ptz: ") and "\n" not in str(info.value)
    end = 9 + int.from_bytes(blob[5:9], "little")
    assert blob.startswith(ARTIFACT_MAGIC) and unpack_artifact(rebuild(blob, lambda h: h), "same")[1] == r
    older = rebuild(blob, lambda h: {**h, "recipe": {**h["recipe"], "shuffle": True}})  # before the field was dropped
    assert unpack_artifact(older, "older")[1] == r
    assert json.loads(zlib.decompress(blob[9:end]))["sha256"] == hashlib.sha256(blob[end:]).hexdigest()


def correlated_hessians(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hs = []
    for _ in range(n):
        x = torch.randn(2048, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols))
        hs.append(x.T @ x / len(x))
    return torch.stack(hs)


def test_gptq_on_a_stack_equals_gptq_one_matrix_at_a_time():
    torch.manual_seed(4)
    w, h = torch.randn(5, 96, 200), correlated_hessians(5, 200, 4)
    h[2, 7, :] = h[2, :, 7] = 0  # an input that never fires
    codes, scale = gptq_quantize(w, h, 6, 12.85, block=64)
    for i in range(5):
        one = gptq_quantize(w[i], h[i], 6, 12.85, block=64)
        assert torch.equal(one[0], codes[i]) and torch.equal(one[1], scale[i])


def test_act_order_makes_gptq_independent_of_the_column_order():
    """Columns go in descending order of the Hessian's diagonal, whatever order they come in."""
    torch.manual_seed(5)
    w, h = torch.randn(64, 160), correlated_hessians(1, 160, 5)[0]
    perm = torch.randperm(160)
    q, _ = gptq_quantize(w, h, 6, 12.85)
    q_perm, _ = gptq_quantize(w[:, perm], h[perm][:, perm], 6, 12.85)
    assert torch.equal(q[:, perm], q_perm)


@pytest.mark.parametrize("bits", [5, 6, 8])
@pytest.mark.parametrize("sigmas", [0.0, 12.85])
def test_gptq_cuts_the_output_error_of_rounding_by_half_on_correlated_inputs(bits, sigmas):
    """Same steps and code range as rounding; on correlated features the layer's output error is
    about 0.4 of round-to-nearest's (measured 0.39-0.40)."""
    torch.manual_seed(5)
    n, d_in, d_out = 4096, 256, 128
    x = torch.randn(n, d_in) @ (torch.randn(d_in, d_in) * torch.logspace(0, -2, d_in)[None, :]).T
    w = torch.randn(d_out, d_in) * 0.05
    q_rtn, s_rtn = quantize_rows(w, bits, sigmas)
    q_gptq, s_gptq = gptq_quantize(w, x.T @ x / n, bits, sigmas, block=64)
    assert torch.equal(s_rtn, s_gptq) and q_gptq.abs().max() <= 2 ** (bits - 1) - 1
    err_rtn = (x @ (dequantize_rows(q_rtn, s_rtn) - w).T).norm()
    err_gptq = (x @ (dequantize_rows(q_gptq, s_gptq) - w).T).norm()
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)


def test_gptq_on_identity_hessian_is_rounding():
    torch.manual_seed(6)
    w = torch.randn(64, 96)
    assert torch.equal(quantize_rows(w, 6, 12.85)[0], gptq_quantize(w, torch.eye(96), 6, 12.85, damp=0.0)[0])


def test_quantize_state_uses_gptq_where_a_hessian_exists_and_q_k_v_share_c_q_s():
    state, r = synthetic_state(), recipe()
    h = correlated_hessians(1, 288, 7)[0]
    stored = quantize_state(state, r, {"blocks.0.attn.c_q.weight": h, "tok_emb.weight": h})
    for name in ("blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight"):
        assert torch.equal(stored[name].values, gptq_quantize(state[name], h, 6, 12.85)[0])
    assert torch.equal(stored["tok_emb.weight"].values, gptq_quantize(state["tok_emb.weight"], h, 8, 20.0)[0])
    fc = "blocks.0.mlp.fc.weight"
    assert torch.equal(stored[fc].values, quantize_rows(state[fc], 6, 12.85)[0])


def test_the_head_hessian_is_the_mean_outer_product_of_the_final_hidden_states():
    import contextlib

    from test_model import tiny_cfg
    from train_gpt import GPT, collect_hessians, plan_for

    torch.manual_seed(0)
    cfg = tiny_cfg()
    model, plan = GPT(cfg), plan_for(cfg, cfg.repeats)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16)) for _ in range(3)]
    hessians = collect_hessians(model, plan, batches, contextlib.nullcontext)
    with torch.no_grad():
        h = torch.cat([model.hidden(x, plan).reshape(-1, cfg.model_dim) for x in batches])
    assert torch.allclose(hessians["tok_emb.weight"], h.T @ h / len(h), rtol=1e-4, atol=1e-6)
    blocks = {n.split(".", 2)[2].removesuffix(".weight") for n in hessians if n.startswith("blocks.")}
    assert blocks == {"attn.c_q", "attn.proj", "mlp.fc", "mlp.proj"}  # c_k and c_v read c_q's input
    assert len(hessians) == 4 * cfg.unique_blocks + 1


def test_hessians_are_float_products_under_bf16_autocast():
    """GPTQ needs a positive-definite Hessian: collected under autocast it must still be the
    float32 product (a bf16 one is not PSD and broke Cholesky on a GPU)."""
    import contextlib
    from functools import partial

    from test_model import tiny_cfg
    from train_gpt import GPT, collect_hessians, plan_for

    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = GPT(cfg)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16))]
    plain = collect_hessians(model, plan_for(cfg, cfg.repeats), batches, contextlib.nullcontext)
    mixed = collect_hessians(model, plan_for(cfg, cfg.repeats), batches,
                             partial(torch.autocast, "cpu", dtype=torch.bfloat16))
    for name, h in plain.items():
        assert mixed[name].dtype == torch.float32
        assert (mixed[name] - h).norm() < 0.05 * h.norm(), name  # bf16 activations, float products
        assert torch.linalg.eigvalsh(mixed[name].double()).min() > -1e-6 * h.diagonal().sum()


def fit(state, budget, hessians=None, **env):
    lines = []
    r = recipe(COMPRESSOR="zstd", **env)
    blob, fitted = fit_artifact(state, hessians, r, budget, lines.append)
    return blob, fitted, r, lines


def test_a_fitting_artifact_is_written_as_is_after_one_try():
    state = synthetic_state()
    r = recipe(COMPRESSOR="zstd")
    size = len(pack_artifact(quantize_state(state, r), r))
    blob, fitted, start, lines = fit(state, size)
    assert fitted == start and len(blob) == size and len([x for x in lines if x.startswith("export_try:")]) == 1
    assert re.fullmatch(rf"export_try:1 {re.escape(start.describe())} bytes:{size} budget:{size} fits "
                        r"quantize:[\d.]+s serialize:[\d.]+s compress:[\d.]+s", lines[0])


@pytest.mark.parametrize("cut", [0.97, 0.8])
def test_an_oversized_artifact_is_coarsened_to_land_just_under_the_target(cut):
    state = synthetic_state()
    r = recipe(COMPRESSOR="zstd")
    budget = int(cut * len(pack_artifact(quantize_state(state, r), r)))
    blob, fitted, start, lines = fit(state, budget)
    assert len(blob) <= budget and blob == pack_artifact(quantize_state(state, fitted), fitted)
    assert budget - len(blob) < 0.01 * budget  # a step of 1% in k moves a group's bytes by ~0.4%
    assert all(getattr(fitted, g).clip_sigmas >= getattr(start, g).clip_sigmas for g in ("attn", "mlp", "embed"))
    assert lines[-1].startswith("export_try:") and "fits" in lines[-1] and "over" in lines[0]


def test_coarsening_goes_to_the_group_that_loses_least_per_byte():
    """With attention and head inputs weighted 10^4 times the MLP's, only the MLP's steps grow."""
    state = synthetic_state()
    r = recipe(COMPRESSOR="zstd")
    budget = int(0.9 * len(pack_artifact(quantize_state(state, r), r)))
    hessians = {"blocks.0.attn.c_q.weight": 1e4 * torch.eye(288), "blocks.0.mlp.fc.weight": torch.eye(288),
                "tok_emb.weight": 1e4 * torch.eye(288)}
    _, fitted, start, _ = fit(state, budget, hessians)
    assert (fitted.attn, fitted.embed) == (start.attn, start.embed)
    assert fitted.mlp.clip_sigmas > start.mlp.clip_sigmas * FIT_STEP


def test_an_impossible_target_raises_naming_target_bytes():
    with pytest.raises(ArtifactTooLarge, match="TARGET_BYTES") as info:
        fit(synthetic_state(), 20_000)
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactTooLarge, match="TARGET_BYTES"):  # max-based steps (k = 0) are never coarsened
        fit(synthetic_state(), 300_000, MATRIX_CLIP_SIGMAS=0, EMBED_CLIP_SIGMAS=0)


def test_brotli_missing_is_a_one_line_error(tiny_data, monkeypatch):
    import train_gpt
    from conftest import tiny_env
    from train_gpt import ConfigError, check_inputs

    pytest.importorskip("brotli")
    r = recipe(COMPRESSOR="brotli")
    blob = pack_artifact(quantize_state(synthetic_state(), r), r)
    monkeypatch.setattr(train_gpt, "brotli", None)
    with pytest.raises(ConfigError, match="COMPRESSOR=brotli: its package is missing"):
        check_inputs(build_config(tiny_env(tiny_data, COMPRESSOR="brotli")))
    with pytest.raises(DataError, match="a.ptz: written with brotli, whose package is missing"):
        unpack_artifact(blob, "a.ptz")


@pytest.mark.parametrize("cap, reserve, expected", [(0, 12, 8), (600, 12, 8), (600, 1e-9, 1)])
def test_calibration_fits_its_reserve(capsys, cap, reserve, expected):
    """A wallclock-capped run calibrates on as many of its GPTQ_BATCHES as the reserve holds at the speed measured in
    warmup (at least one); an ITERATIONS-bounded run, or one whose reserve holds them all, takes every batch. The
    training clock keeps only what those batches need (+1 s), at most EXPORT_RESERVE_SECONDS."""
    import train_gpt

    cfg = build_config({**PLAIN_SHAPE, "VOCAB_SIZE": "64", "MODEL_DIM": "16", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
                        "NUM_LAYERS": "2", "TRAIN_SEQ_LEN": "8", "TRAIN_BATCH_TOKENS": "32", "GPTQ_BATCHES": "8",
                        "MAX_WALLCLOCK_SECONDS": str(cap), "EXPORT_RESERVE_SECONDS": str(reserve)})
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"))

    class Loader:
        def next_batch(self):
            x = torch.randint(0, 64, (4, 8))
            return x, x

    batches, kept = train_gpt.calibration_batches(cfg, rt, train_gpt.GPT(cfg), Loader)
    line = capsys.readouterr().out
    assert batches == expected and ("gptq_calibration_plan" in line) == (cap > 0)
    if cap == 0 or reserve < 1:
        assert kept == reserve  # no clock to stop; a reserve too short for one batch stays as set
    else:
        batch_time = float(re.search(r"batch_time:([0-9.]+)s", line)[1])
        assert kept == pytest.approx(min(reserve, expected * batch_time / 0.9 + 1.0), abs=0.005)  # the line rounds to ms
        assert 1.0 < kept < reserve and f"reserve:{kept:.1f}s of EXPORT_RESERVE_SECONDS=12" in line
        cfg = dataclasses.replace(cfg, export_reserve_seconds=kept)
        assert train_gpt.training_seconds(cfg) == pytest.approx(cap - kept)  # the clock trains the rest
