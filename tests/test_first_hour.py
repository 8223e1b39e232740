"""What a new user meets first on a machine without a GPU: a warning before hours of CPU training, the tiny CPU recipe
of data/README.md (run as written), an evaluation-budget refusal that names the part that does not fit, and an export
that cannot fit refused in seconds, before any try, by the run and by the dry run alike (whose export bench gives each
codec's bytes)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

import train_gpt
from conftest import CORPUS, PLAIN_SHAPE, ROOT, clean_environ, final_summary, run_script, tiny_env
from train_gpt import (GPT, ArtifactTooLarge, Runtime, UserError, build_config, build_model, check_eval_budget,
                       check_reachable, export_recipe, fit_artifact, pack_artifact, quantize_state,
                       quantized_names)

CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = dict(PLAIN_SHAPE, VOCAB_SIZE="1024", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", NUM_LAYERS="2", TRAIN_SEQ_LEN="64",
            TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="4096")


def test_the_default_model_on_the_cpu_warns_once(capsys):
    build_model(build_config({}), CPU)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING: running on the CPU with 35,944,615 parameters: expect hours; "
                        "see data/README.md for a tiny CPU recipe"]
    build_model(build_config(TINY), CPU)
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("env, hint", [
    (dict(TTT_LR="0.01", TTT_EPOCHS="3", EVAL_STRIDE="0", TTT_CHUNK="1024"), "TTT is "),  # 7 steps of 3 epochs
    (dict(TTT_LR="0", EVAL_STRIDE="8"), "raise EVAL_STRIDE"),
])
def test_eval_budget_refusal_names_what_dominates(env, hint):
    cfg = build_config({**TINY, **env, "EVAL_BUDGET_S": "1e-9"})
    with pytest.raises(UserError, match=hint) as refused:
        check_eval_budget(GPT(cfg, torch.float32), cfg, CPU, [(0, 8191)])  # one document, 8192 tokens
    message = str(refused.value)
    assert message.startswith("EVAL_BUDGET_S=1e-09: the final evaluations would take about")
    assert ("TTT_EPOCHS" in message) == (env["TTT_LR"] != "0")


# The kernel each combination gets (COMPILE, DOC_MASK, ATTN_BACKEND, device, flash_attn_interface importable):
# FA3 only where a compiled CUDA run may use it; flex_attention for documents on compiled CUDA without it; else SDPA.
NOT_SDPA = {
    (1, 0, "auto", "cuda", True): "fa3",
    (1, 1, "auto", "cuda", True): "fa3_varlen",
    (1, 1, "auto", "cuda", False): "flex_attention",
    (1, 1, "sdpa", "cuda", True): "flex_attention",
    (1, 1, "sdpa", "cuda", False): "flex_attention",
}
COMBINATIONS = [(c, d, b, device, fa3) for c in (0, 1) for d in (0, 1) for b in ("auto", "sdpa")
                for device in ("cpu", "cuda") for fa3 in (True, False)]


@pytest.mark.parametrize("compile_, doc_mask, backend, device, fa3", COMBINATIONS)
def test_attention_backend_is_named_by_a_function_the_model_can_extend(monkeypatch, compile_, doc_mask, backend,
                                                                       device, fa3):
    """Every combination against the table above (32 of them): the name the log header prints, and from which
    build_model decides whether the blocks get FA3 (a name starting with fa3)."""
    # an importable stand-in, or None in sys.modules: `import` then raises ImportError, as when FA3 is not installed
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace() if fa3 else None)
    cfg = build_config(dict(TINY, COMPILE=str(compile_), DOC_MASK=str(doc_mask), ATTN_BACKEND=backend))
    expected = NOT_SDPA.get((compile_, doc_mask, backend, device, fa3), "sdpa")
    assert train_gpt.attention_backend_name(cfg, device) == expected


def quickstart() -> tuple[str, list[str]]:
    """data/README.md's offline quick start: its text, and its commands (its tiny CPU run last), one per line as a
    shell reads them."""
    text = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Offline quickstart from any text files"):text.index("\n## Tests")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return section, [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_tiny_cpu_recipe_runs_as_written(tmp_path):
    """data/README.md's quick start, run in a temporary folder: the reader's own text files are the FineWeb sample's
    270 pages (copied where the recipe's `cp` puts the reader's, as the README says it measured), and `python X.py`
    runs this interpreter on the repo's X.py; nothing else is changed (clean_environ's one thread: two spin against
    other jobs). It trains, exports and prints the score the README states (to 0.03: one thread scored 0.005 off)."""
    sample = CORPUS / "fineweb_sample" / "train.jsonl.zst"
    if not sample.is_file():
        pytest.skip(f"corpus file not found: {sample}")
    section, (copy, *commands) = quickstart()
    assert copy.startswith("mkdir -p my_texts && cp ") and len(commands) == 2, commands
    (tmp_path / "my_texts").mkdir()
    shutil.copy(sample, tmp_path / "my_texts")
    for command in commands:
        command = re.sub(r"\bpython (\S+\.py)\b", lambda m: f"{sys.executable} {ROOT / m[1]}", command)
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=clean_environ(), capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    line = r"final_mixed_brotli_roundtrip val_loss:[\d.]+ val_bpb:([\d.]+) eval_time:"
    score, stated = re.search(rf"^{line}\d+ms$", result.stdout, re.M), re.search(line, section)
    summary = final_summary(result.stdout)
    assert score and stated and summary["steps"] == 100 and summary["score_line"] == score[0], result.stdout[-3000:]
    assert abs(float(score[1]) - float(stated[1])) < 0.03, (score[0], stated[0])


# A model with quantized matrices (the MLP's 128 x 576 and the tied embedding's 1024 x 128 exceed 65,536 weights)
UNFIT = dict(TINY, MODEL_DIM="128", MLP_MULT="4.5")


def test_an_export_that_cannot_fit_is_refused_before_any_try():
    """fit_artifact's first step: the smallest artifact it could reach (every std-clipped group at 4x its sigmas)
    estimated from the codes' entropy, a floor under what that recipe really packs to, so a model it cannot fit
    ends in one line at once instead of minutes of tries."""
    cfg = build_config(UNFIT)
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in GPT(cfg).state_dict().items()}
    recipe = export_recipe(cfg)
    coarsest = recipe.with_sigmas({g: 4 * getattr(recipe, g).clip_sigmas for g in ("attn", "mlp", "embed")})
    smallest = len(pack_artifact(quantize_state(state, coarsest), coarsest))
    check_reachable(state, recipe, smallest)  # what the coarsest recipe packs to is never refused
    codes = {n: state[n] for n in quantized_names(state)}  # what the floor counts: the quantized matrices
    smallest_codes = len(pack_artifact(quantize_state(codes, coarsest), coarsest))
    tries, start = [], time.perf_counter()
    with pytest.raises(ArtifactTooLarge) as refused:
        fit_artifact(state, None, recipe, 20_000, tries.append)
    assert tries == [] and time.perf_counter() - start < 5  # no export tried
    floor = re.fullmatch(r"TARGET_BYTES: the model file needs at least (\d+) bytes and 20000 remain after the code, "
                         r"even with steps 4x coarser \(no export tried\); lower QUANT_BITS_\* or the model size",
                         str(refused.value))
    assert floor and 0.7 * smallest_codes < int(floor[1]) < smallest_codes, (str(refused.value), smallest_codes)


def test_the_dry_run_refuses_it_alike(tiny_data, tmp_path):
    """scripts/dry_run.py makes the same check on Gaussian weights: exit 3, the run's line, no steps timed."""
    env = tiny_env(tiny_data, **{k: v for k, v in UNFIT.items() if k not in PLAIN_SHAPE}, TARGET_BYTES=60_000)
    result = run_script(env, tmp_path, timeout=120, script=ROOT / "scripts" / "dry_run.py")
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert re.fullmatch(r"error: TARGET_BYTES: the model file needs at least \d+ bytes and \d+ remain after the code, "
                        r"even with steps 4x coarser \(no export tried\); lower QUANT_BITS_\* or the model size\n",
                        result.stderr)
    assert "dry_run step:" not in result.stdout and not (tmp_path / "runs").exists()


def test_the_dry_run_s_export_bench_gives_each_codec_s_bytes_and_seconds(tiny_data, tmp_path):
    env = tiny_env(tiny_data, **{k: v for k, v in UNFIT.items() if k not in PLAIN_SHAPE})
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "dry_run.py"), "--export-bench"], cwd=tmp_path,
                            env={**clean_environ(), **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = re.findall(r"^dry_run export_bench attn:int8/k12.85 mlp:int8/k12.85 embed:int8/k20 codec:(\w+)x16 "
                       r"bytes:(\d+) quantize:[\d.]+s serialize:[\d.]+s compress:[\d.]+s$", result.stdout, re.M)
    assert [codec for codec, _ in lines] == ["brotli", "zstd"], result.stdout[-2000:]
    assert "dry_run step:" not in result.stdout and not (tmp_path / "runs").exists()
