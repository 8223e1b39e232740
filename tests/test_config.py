"""Configuration: strict parsing, relations between knobs, typo detection, and README completeness."""
from __future__ import annotations

import random
import re
import string
import sys

import pytest

from conftest import PLAIN_SHAPE, ROOT, run_script, tiny_env

sys.path.insert(0, str(ROOT / "scripts"))
from env_table import render_default  # noqa: E402
from train_gpt import ENV_ALLOWLIST, ENV_ALLOWED_PREFIXES, ENV_REMOVED, Config, ConfigError, build_config, env_knobs


def test_defaults_are_the_frontier_record_stack():
    """The 2026-04-09 record's configuration (1.0810 on 8xH100) through our knobs, and its export."""
    cfg = build_config({})
    assert (cfg.unique_blocks, cfg.num_layers, cfg.loop_start, cfg.core_last, cfg.depth_phases) == (
        11, 17, 3, 5, ((0.35, 1), (1.0, 3)))
    assert (cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult, cfg.mlp_act) == (512, 8, 4, 4.0, "leaky_relu2")
    assert (cfg.rope_dims, cfg.ln_scale, cfg.parallel_residual_start, cfg.skip_gates_enabled, cfg.xsa_last_n) == (
        16, True, 7, True, -1)
    assert (cfg.layer_rows, cfg.loop_embed, cfg.ortho_init, cfg.qk_gain_init) == ("block", False, True, 5.0)
    assert (cfg.vocab_size, cfg.train_seq_len, cfg.train_batch_tokens) == (8192, 2048, 786_432)
    assert (cfg.matrix_lr, cfg.scalar_lr, cfg.tied_embed_lr, cfg.muon_momentum, cfg.muon_momentum_warmup_start,
            cfg.muon_momentum_warmup_frac) == (0.026, 0.02, 0.03, 0.97, 0.92, 0.33)
    assert (cfg.muon_weight_decay, cfg.embed_wd, cfg.adam_wd, cfg.grad_clip_norm, cfg.warmdown_frac) == (
        0.095, 0.085, 0.02, 0.3, 0.85)
    # the 2026-04-27 record's additions that measured better on the golf bench (docs/ablations.md)
    assert (cfg.muon_ns, cfg.smear_gate, cfg.min_lr, cfg.beta2, cfg.doc_mask) == ("polar", True, 0.1, 0.99, False)
    assert cfg.muon_row_normalize and cfg.ema_horizon == 0.063  # 0.9965 per step at the record's ~4,550 steps
    assert (cfg.ttt_lr, cfg.ttt_epochs, cfg.ttt_grad_clip, cfg.ttt_chunk) == (0.005, 3, 1.0, 32_768)
    assert "8192" in cfg.data_path and "8192" in cfg.tokenizer_path
    assert (cfg.quant_bits_attn, cfg.quant_bits_mlp, cfg.quant_bits_embed, cfg.gptq) == (6, 6, 8, True)
    assert (cfg.matrix_clip_sigmas, cfg.embed_clip_sigmas, cfg.ship_code) == (12.85, 20.0, "packed")
    assert (cfg.gptq_batches, cfg.export_reserve_seconds, cfg.compressor, cfg.target_bytes) == (64, 12.0, "brotli",
                                                                                               16_000_000)
    assert cfg.micro_steps == 6 and cfg.micro_batch_seqs == 64  # 384 sequences of 2048 on one GPU
    assert build_config({}, world_size=8).micro_steps == 1
    assert build_config({"MICRO_BATCH_TOKENS": str(48 * 2048)}).micro_steps == 8
    assert build_config({"TRAIN_BATCH_TOKENS": str(3 * 2048 * 40)}, world_size=1).micro_steps == 2


def test_values_are_parsed_strictly():
    cfg = build_config({"MLP_MULT": "2.5", "SMEAR_GATE": "0", "MLP_ACT": "leaky_relu2", "SEED": " 7 "})
    assert cfg.mlp_mult == 2.5 and cfg.smear_gate is False and cfg.mlp_act == "leaky_relu2" and cfg.seed == 7
    for name, value in [("NUM_LAYERS", "9.0"), ("NUM_LAYERS", "nine"), ("SMEAR_GATE", "yes"),
                        ("MATRIX_LR", "nan"), ("MLP_ACT", "gelu"), ("ROPE_BASE", "")]:
        with pytest.raises(ConfigError, match=name):
            build_config({name: value})


@pytest.mark.parametrize("env, culprit", [
    ({"MODEL_DIM": "500"}, "NUM_HEADS"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"NUM_UNIQUE_LAYERS": "4"}, "NUM_LAYERS"),
    ({"LOOP_START": "20"}, "LOOP_START"),
    ({"LOOP_END": "20"}, "LOOP_END"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
    ({"ITERATIONS": "0", "MAX_WALLCLOCK_SECONDS": "0"}, "ITERATIONS"),
    ({"XSA_LAST_N": "18"}, "XSA_LAST_N"),
    ({"QUANT_BITS_MLP": "4"}, "QUANT_BITS_MLP"),
    ({"EVAL_STRIDE": "-1"}, "EVAL_STRIDE"),
    ({"COMPRESSOR": "bzip2"}, "COMPRESSOR"),
    ({"MATRIX_CLIP_SIGMAS": "-1"}, "MATRIX_CLIP_SIGMAS"),
    ({"TARGET_BYTES": "0"}, "TARGET_BYTES"),
])
def test_bad_relations_name_the_variable(env, culprit):
    with pytest.raises(ConfigError, match=culprit):
        build_config({**PLAIN_SHAPE, **env})


def one_edit(name: str, rng: random.Random) -> str:
    alphabet = string.ascii_uppercase + "_" + string.digits
    i = rng.randrange(len(name) + 1)
    kind = rng.choice(["substitute", "insert", "delete"])
    if kind == "insert" or i == len(name):
        return name[:i] + rng.choice(alphabet) + name[i:]
    if kind == "delete":
        return name[:i] + name[i + 1:]
    return name[:i] + rng.choice(alphabet.replace(name[i], "")) + name[i + 1:]


def test_random_one_edit_typos_of_every_knob_are_errors():
    rng, knobs, checked = random.Random(0), env_knobs(), 0
    for name in knobs:
        for _ in range(8):
            typo = one_edit(name, rng)
            if typo in knobs or typo in ENV_ALLOWLIST or typo.startswith(ENV_ALLOWED_PREFIXES) or not typo:
                continue
            with pytest.raises(ConfigError) as err:
                build_config({typo: "1"})
            assert typo in str(err.value) and "did you mean" in str(err.value)
            checked += 1
    assert checked > 5 * len(knobs)


def test_the_record_s_gptq_names_are_aliases_and_may_not_double_a_knob():
    cfg = build_config({"GPTQ_CALIBRATION_BATCHES": "32", "GPTQ_RESERVE_SECONDS": "9"})
    assert (cfg.gptq_batches, cfg.export_reserve_seconds) == (32, 9.0)
    with pytest.raises(ConfigError, match="GPTQ_CALIBRATION_BATCHES and GPTQ_BATCHES"):
        build_config({"GPTQ_CALIBRATION_BATCHES": "32", "GPTQ_BATCHES": "8"})
    with pytest.raises(ConfigError, match="GPTQ_BATCHES='x'"):
        build_config({"GPTQ_CALIBRATION_BATCHES": "x"})


def test_removed_knobs_are_refused_by_name_not_ignored(tmp_path, tiny_data):
    """An ignored DRY_RUN=1 would start a real run: each removed knob stops it in one line that names it."""
    assert not set(ENV_REMOVED) & set(env_knobs())
    for name in ENV_REMOVED:
        with pytest.raises(ConfigError, match=f"^{name}: no longer a knob; "):
            build_config({name: "1"})
    result = run_script(tiny_env(tiny_data, DRY_RUN=1), tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "DRY_RUN: no longer a knob; run scripts/dry_run.py" in result.stderr and not (tmp_path / "runs").exists()


def test_typo_error_names_the_knob():
    with pytest.raises(ConfigError, match="NUM_LAYERS"):
        build_config({"NUM_LAYER": "9"})
    with pytest.raises(ConfigError, match="MAX_WALLCLOCK_SECONDS"):
        build_config({"MAX_WALCLOCK_SECOND": "60"})


def test_launcher_and_system_variables_are_allowed():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "x",
           "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x", "NCCL_DEBUG": "INFO", "CUDA_VISIBLE_DEVICES": "0",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ".", "PATH": "/bin", "PWD": "/", "HOME": "/"}
    assert build_config(env).world_size == 1


def test_bad_value_exits_2_with_one_line_before_any_work(tmp_path, tiny_data):
    result = run_script(tiny_env(tiny_data, NUM_HEADS="3"), tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "NUM_HEADS" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_readme_documents_every_knob_with_its_default():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", readme, re.M)}
    for name, field in env_knobs().items():
        assert name in rows, f"README table lacks {name}"
        shown = render_default(field.default)
        assert rows[name] == shown, f"README default of {name} is {rows[name]!r}, code has {shown!r}"
    assert set(rows) <= set(env_knobs()), f"README documents unknown knobs: {set(rows) - set(env_knobs())}"


def test_config_is_frozen():
    import dataclasses

    cfg = build_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert isinstance(cfg, Config) and cfg.seed == build_config({}).seed
