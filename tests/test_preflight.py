"""scripts/preflight.py on this CPU machine: every check against stand-ins that are right and ones that are wrong
(GPUs through a patched torch.cuda, fake flash_attn_interface modules, data folders written by data/build_shards.py
and then corrupted, a gloo all-reduce, stand-in train_gpt.py scripts for the warm compile), and the exit codes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, clean_environ, read_docs, tiny_env, tokenizer_path

sys.path.insert(0, str(ROOT / "scripts"))
import preflight  # noqa: E402

import train_gpt  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A data folder as data/build_shards.py writes it (summary.json with each shard's sha256): 3 train shards."""
    out = build_shards(tmp_path_factory.mktemp("preflight"), 12, tokenizer_path(1024), "--shard-tokens", "3000")
    assert len(list(out.glob("fineweb_train_*.bin"))) >= 2
    return out


def build_shards(folder: Path, documents: int, tokenizer: Path, *args: str) -> Path:
    """data/build_shards.py on the first `documents` of the FineWeb sample, a quarter of them for validation."""
    docs = folder / "docs"
    docs.mkdir()
    for i, text in enumerate(read_docs("fineweb_sample/val.jsonl.zst")[:documents]):
        (docs / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    out = folder / "shards"
    result = subprocess.run([sys.executable, str(ROOT / "data" / "build_shards.py"), "--input", str(docs),
                             "--val-fraction", "0.25", "--tokenizer", str(tokenizer), "--out", str(out),
                             "--workers", "1", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def cfg_for(data: Path, **env):
    return train_gpt.build_config(tiny_env(data, **env))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def flip_a_token(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[1024 + 10] ^= 1  # a token, not the header: the size and header stay valid
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_a_built_folder_passes_by_sha256_and_each_kind_of_damage_fails(built, tmp_path):
    good = preflight.check_data(train_gpt, cfg_for(built))
    shards = len(list(built.glob("*.bin")))
    assert good.status == "PASS" and f"sha256 of {shards + 1} files matches" in good.figure, good  # + the tokenizer
    assert preflight.check_data(train_gpt, cfg_for(built), hash_files=False).figure.endswith("sizes only (--no-hash) against "
                                                                                 f"{built / 'summary.json'}")
    flipped = copy_of(built, tmp_path / "a")
    flip_a_token(flipped / "fineweb_train_000001.bin")
    bad = preflight.check_data(train_gpt, cfg_for(flipped))
    assert bad.status == "FAIL" and "fineweb_train_000001.bin: sha256 " in bad.figure, bad
    assert preflight.check_data(train_gpt, cfg_for(flipped), hash_files=False).status == "PASS"  # sizes cannot see it
    cut = copy_of(built, tmp_path / "b")
    path = cut / "fineweb_val_000000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    bad = preflight.check_data(train_gpt, cfg_for(cut))
    assert bad.status == "FAIL" and "fineweb_val_000000.bin: " in bad.figure and "its header says" in bad.figure, bad
    extra = copy_of(built, tmp_path / "c")
    shutil.copy(extra / "fineweb_train_000000.bin", extra / "fineweb_train_000099.bin")
    (extra / "fineweb_train_000001.bin").unlink()
    bad = preflight.check_data(train_gpt, cfg_for(extra))
    assert "fineweb_train_000099.bin: not listed in" in bad.figure, bad
    assert "fineweb_train_000001.bin: listed in" in bad.figure and "not in DATA_PATH" in bad.figure, bad
    other = preflight.check_data(train_gpt, cfg_for(built, TOKENIZER_PATH=tokenizer_path(8192), VOCAB_SIZE=8192))
    assert other.status == "FAIL" and "fineweb_8192_bpe.model: sha256 " in other.figure, other  # not the shards' one
    wrong_vocab = preflight.check_data(train_gpt, cfg_for(built, VOCAB_SIZE=512))
    assert "1024 pieces, VOCAB_SIZE=512" in wrong_vocab.figure, wrong_vocab
    missing = preflight.check_data(train_gpt, cfg_for(tmp_path / "nowhere"))
    assert missing.status == "FAIL" and "folder not found" in missing.figure


def test_a_caseops_folder_passes_with_its_byte_sidecars_hashed_and_checked(tmp_path):
    """data/build_shards.py --transform caseops writes fineweb_val_bytes_*.bin beside the val shards and lists them
    in summary.json: they are not val shards (the first GPU preflight counted one as a shard missing from
    summary.json and failed), but they are checked like shards, since val_bpb divides by them."""
    tokenizer = tokenizer_path(8192).with_name("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    if not tokenizer.is_file():
        pytest.skip(f"CaseOps tokenizer not found: {tokenizer.name}")
    out = build_shards(tmp_path, 8, tokenizer, "--transform", "caseops")
    sidecars = sorted(out.glob("fineweb_val_bytes_*.bin"))
    assert sidecars
    cfg = cfg_for(out, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=8192)
    good = preflight.check_data(train_gpt, cfg)
    files = len(list(out.glob("*.bin"))) + 1  # the shards, the sidecars and the tokenizer
    assert good.status == "PASS" and f"+ {len(sidecars)} byte sidecar(s)" in good.figure, good
    assert f"sha256 of {files} files matches" in good.figure, good
    flip_a_token(sidecars[0])
    bad = preflight.check_data(train_gpt, cfg)
    assert bad.status == "FAIL" and f"{sidecars[0].name}: sha256 " in bad.figure, bad


def test_a_downloaded_folder_is_checked_by_size_unless_its_manifest_lists_hashes(built, tmp_path):
    """The downloader's layout: <root>/manifest.json and <root>/datasets/fineweb10B_sp1024/ (no summary.json)."""
    data = tmp_path / "datasets" / "fineweb10B_sp1024"
    data.mkdir(parents=True)
    for p in built.glob("*.bin"):
        shutil.copy(p, data / p.name)
    train = len(list(data.glob("fineweb_train_*.bin")))
    manifest = dict(datasets=[dict(name="fineweb10B_sp1024", tokenizer_name="sp_bpe_1024",
                                   stats=dict(files_train=train + 5, files_val=1))],  # a subset of the train shards
                    tokenizers=[dict(name="sp_bpe_1024", model_path="tokenizers/fineweb_1024_bpe.model")])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    sizes = preflight.check_data(train_gpt, cfg_for(data))
    assert sizes.status == "PASS" and f"sizes only: {tmp_path / 'manifest.json'} lists no sha256" in sizes.figure
    manifest["files"] = [dict(path=f"datasets/fineweb10B_sp1024/{p.name}", bytes=p.stat().st_size,
                              sha256=preflight.sha256_of(p)) for p in sorted(data.glob("*.bin"))]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert f"sha256 of {train + 1} files matches" in preflight.check_data(train_gpt, cfg_for(data)).figure
    flip_a_token(data / "fineweb_val_000000.bin")
    assert "fineweb_val_000000.bin: sha256" in preflight.check_data(train_gpt, cfg_for(data)).figure
    (data / "fineweb_val_000000.bin").unlink()
    gone = preflight.check_data(train_gpt, cfg_for(data))
    assert gone.status == "FAIL" and "no fineweb_val_*.bin" in gone.figure and "fineweb_val_000000.bin: listed" in \
        gone.figure
    alone = copy_of(built, tmp_path / "a" / "b")  # no manifest.json in the two folders above it
    (alone / "summary.json").unlink()
    warned = preflight.check_data(train_gpt, cfg_for(alone))
    assert warned.status == "WARN" and "headers and sizes only" in warned.figure
    other = tmp_path / "datasets" / "fineweb10B_sp4096"  # beside the one the manifest describes, not in it
    shutil.copytree(alone, other)
    assert preflight.check_data(train_gpt, cfg_for(other)).status == "WARN"


# ---------------------------------------------------------------------------------------------
# GPUs, config, disk
# ---------------------------------------------------------------------------------------------


def fake_gpus(monkeypatch, names, used_gib=0.5):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(names))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: ((80 - used_gib) * 2**30, 80 * 2**30))


H100 = "NVIDIA H100 80GB HBM3"


def test_gpus_count_and_kind(monkeypatch):
    fake_gpus(monkeypatch, [H100] * 8)
    assert preflight.check_gpus(8) == ("PASS", "gpus", f"8 x {H100}")
    fake_gpus(monkeypatch, [H100] * 4)
    assert preflight.check_gpus(8) == ("FAIL", "gpus", f"4 x {H100}: 4 GPU(s), the run needs 8 (--gpus)")
    fake_gpus(monkeypatch, [H100] * 7 + ["NVIDIA H200"])
    assert preflight.check_gpus(8).status == "WARN" and "not H100s" in preflight.check_gpus(8).figure
    fake_gpus(monkeypatch, [H100] * 8, used_gib=30)
    assert "memory in use by another process: GPU 0 30.0 GiB" in preflight.check_gpus(8).figure
    fake_gpus(monkeypatch, [])
    assert preflight.check_gpus(8)[:2] == ("FAIL", "gpus") and preflight.check_gpus(8).figure.startswith("no GPU")


def test_config_typos_and_impossible_settings_fail_with_the_configs_own_message(built):
    result, cfg = preflight.check_config(train_gpt, {"NUM_LAYER": "9"}, 8)
    assert result == ("FAIL", "config", "NUM_LAYER: unknown variable; did you mean NUM_LAYERS?") and cfg is None
    result, _ = preflight.check_config(train_gpt, {"TRAIN_BATCH_TOKENS": "1000"}, 8)
    assert result.status == "FAIL" and result.figure.startswith("TRAIN_BATCH_TOKENS=1000: must be a multiple")
    result, cfg = preflight.check_config(train_gpt, {"MATRIX_LR": "0.03", "PATH": "/bin"}, 8)
    assert result.status == "PASS" and "1 variable(s) set: MATRIX_LR=0.03; 8 process(es), 1 micro-step(s) of 48 x " \
        "2048 tokens" in result.figure and cfg.matrix_lr == 0.03


def test_disk_needs_what_train_gpt_may_write(built, tmp_path, monkeypatch):
    cfg = cfg_for(built, OUT_DIR=tmp_path / "runs" / "a")
    params = sum(p.numel() for p in train_gpt.GPT(cfg).parameters())
    need = (10 * 8 + 3) * 4 * params + 16_000_000
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=need))
    assert preflight.check_disk(train_gpt, cfg, 8).status == "PASS"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=need - 1))
    result = preflight.check_disk(train_gpt, cfg, 8)
    assert result.status == "FAIL" and f"at {tmp_path}" in result.figure and f"({params:,} parameters)" in result.figure


# ---------------------------------------------------------------------------------------------
# FlashAttention 3 stand-ins
# ---------------------------------------------------------------------------------------------


def sdpa_float32(q, k, v, causal):
    return preflight.sdpa_attention(q.float(), k.float(), v.float()) if causal else F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().repeat_interleave(2, 2).transpose(1, 2),
        v.float().repeat_interleave(2, 2).transpose(1, 2)).transpose(1, 2)


def fake_fa3(monkeypatch, kernel):
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = kernel
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)


SHAPE = (2, 64, 8, 4, 64)  # the run's heads and head dim; a short sequence for the CPU


@pytest.mark.parametrize("name, kernel, status, message", [
    ("right", lambda q, k, v, causal: sdpa_float32(q, k, v, causal).bfloat16(), "PASS", "out "),
    ("right, (out, lse)", lambda q, k, v, causal: (sdpa_float32(q, k, v, causal).bfloat16(), None), "PASS", "dv "),
    ("not causal", lambda q, k, v, causal: sdpa_float32(q, k, v, False).bfloat16(), "FAIL", "out, dq, dk, dv off"),
    ("wrong gradient", lambda q, k, v, causal: (sdpa_float32(q, k, v, causal) + 0.05 * (q - q.detach())).bfloat16(),
     "FAIL", ": dq off"),  # the same output, dq off by 0.05 grad_out
    ("no gradient", lambda q, k, v, causal: sdpa_float32(q, k, v, causal).detach().bfloat16() + 0 * q, "FAIL",
     ": dq, dk, dv off"),  # detached: zero gradients
    ("raises", lambda q, k, v, causal: (_ for _ in ()).throw(RuntimeError("CUDA error: no kernel image")), "FAIL",
     "flash_attn_func raised RuntimeError: CUDA error: no kernel image"),
])
def test_fa3_against_sdpa(monkeypatch, name, kernel, status, message):
    fake_fa3(monkeypatch, kernel)
    found, numerics = preflight.check_fa3(SHAPE, torch.device("cpu"))
    assert found.status == "PASS" and numerics.status == status and message in numerics.figure, numerics


def test_fa3_missing_or_broken(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import raises ImportError
    [missing] = preflight.check_fa3(SHAPE, torch.device("cpu"))
    assert missing.status == "WARN" and "falls back" in missing.figure
    broken = types.ModuleType("flash_attn_interface")  # no flash_attn_func: a mismatched build
    monkeypatch.setitem(sys.modules, "flash_attn_interface", broken)
    [result] = preflight.check_fa3(SHAPE, torch.device("cpu"))
    assert result == ("FAIL", "fa3", "importing flash_attn_interface raised AttributeError: module "
                                     "'flash_attn_interface' has no attribute 'flash_attn_func'")
    fake_fa3(monkeypatch, lambda *a, **k: None)
    found, skipped = preflight.check_fa3(SHAPE, None)  # no GPU: the import alone
    assert (found.status, skipped.status) == ("PASS", "SKIP")


DOC_CFG = dict(DOC_MASK=1, NUM_HEADS=4, NUM_KV_HEADS=2, MODEL_DIM=64, TRAIN_SEQ_LEN=512, TRAIN_BATCH_TOKENS=4 * 512)


def document_sdpa(masked=True, gradient=1.0):
    """A stand-in maker for check_doc_mask: SDPA in float32 over the batch's documents (or merely causal)."""
    def make(tg, cfg, ids):
        allowed = tg.document_mask(ids)

        def kernel(q, k, v):
            k, v = (t.float().repeat_interleave(2, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=allowed if masked else None,
                                                 is_causal=not masked)
            return (out + (gradient - 1.0) * (q - q.detach())).bfloat16()
        return kernel, "stand-in"
    return make


def raising(tg, cfg, ids):
    raise RuntimeError("Triton compile failed")


@pytest.mark.parametrize("make, status, message", [
    (document_sdpa(), "PASS", "documents=7"),  # a BOS every ~400 tokens in 3 rows, the 4th one document
    (document_sdpa(masked=False), "FAIL", ": out, dq, dk, dv off"),  # attends across documents
    (document_sdpa(gradient=1.05), "FAIL", ": dq off"),  # the same output, dq off by 0.05 grad_out
    (raising, "FAIL", "building the document mask raised RuntimeError: Triton compile failed"),
])
def test_doc_mask_kernel_against_the_boolean_mask(built, make, status, message):
    cfg = cfg_for(built, **DOC_CFG)
    [result] = preflight.check_doc_mask(train_gpt, cfg, torch.device("cpu"), make)
    assert result.name == "doc mask numerics" and result.status == status and message in result.figure, result
    assert make is raising or "stand-in B=4 T=512 heads=4/2 dim=16" in result.figure


def test_the_runs_own_document_attention_matches_the_boolean_mask_forward(built):
    """run_doc_attention builds the kernel the compiled run uses (here flex_attention: no FA3); its forward, on the
    CPU, agrees with the boolean mask (flex has no CPU backward: the gradients are checked on the GPU box)."""
    cfg = cfg_for(built, **DOC_CFG)
    ids = torch.randint(2, cfg.vocab_size, (2, 512))
    ids[:, [0, 100, 333]] = train_gpt.BOS_ID
    kernel, name = preflight.run_doc_attention(train_gpt, cfg, ids)
    want, _ = document_sdpa()(train_gpt, cfg, ids)
    q, k, v = torch.randn(2, 4, 512, 16), torch.randn(2, 2, 512, 16), torch.randn(2, 2, 512, 16)
    with torch.no_grad():
        assert torch.allclose(kernel(q, k, v), want(q, k, v).float(), atol=2e-2)
    assert name == "flex_attention"


def test_doc_mask_check_only_with_doc_mask_and_a_gpu(built):
    assert preflight.check_doc_mask(train_gpt, cfg_for(built), torch.device("cpu")) == []  # DOC_MASK=0: causal
    [skipped] = preflight.check_doc_mask(train_gpt, cfg_for(built, **DOC_CFG), None)
    assert skipped.status == "SKIP"


# ---------------------------------------------------------------------------------------------
# NCCL (gloo here), the warm compile, the whole script
# ---------------------------------------------------------------------------------------------


def test_allreduce_measure_on_two_gloo_processes_and_its_verdicts(monkeypatch):
    m = preflight.measure_allreduce(2, 1 << 20, iters=3, backend="gloo", timeout_s=60)
    assert m["correct"] and m["seconds"] > 0
    assert m["busbw_gbs"] == pytest.approx((1 << 20) / m["seconds"] / 1e9 * 2 * (2 - 1) / 2)  # nccl-tests' busbw
    assert preflight.check_nccl(1, 60).status == "SKIP"
    for busbw, correct, status in ((380.0, True, "PASS"), (180.0, True, "WARN"), (30.0, True, "FAIL"),
                                   (380.0, False, "FAIL")):
        monkeypatch.setattr(preflight, "measure_allreduce", lambda *a, c=correct, b=busbw, **k: dict(
            seconds=1e-3, correct=c, busbw_gbs=b))
        assert preflight.check_nccl(8, 60).status == status
    monkeypatch.setattr(preflight, "measure_allreduce", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("hung")))
    assert preflight.check_nccl(8, 60) == ("FAIL", "nccl", "all-reduce over 8 GPUs failed: hung")


STAND_IN = """import json, os, sys
from pathlib import Path
Path(os.environ["ENV_RECORD"]).write_text(json.dumps(dict(os.environ)))
print("warmup_time:12.5s (compile and priming; not counted as training time)")
print("eval_budget_estimate roundtrip:3.0s sliding:40.0s ttt_mix:{ttt}s total:{total}s budget:600s")
print("eval_budget_competition total:{scaled}s (8 GPUs, 40,540,160 tokens, 50,000 documents; CUDA only)")
print("compile_stats graph_breaks:0 unique_graphs:5 recompiles:0 fx_cache_hits:9 fx_cache_misses:0")
"""
REFUSING = """import sys
print("error: EVAL_BUDGET_S=600: the final evaluations would take about 700 s; raise EVAL_STRIDE", file=sys.stderr)
sys.exit(2)
"""


def test_warm_compile_runs_the_script_train_only_into_a_throwaway_folder(built, tmp_path):
    cfg = cfg_for(built, OUT_DIR=tmp_path / "runs" / "x")
    (tmp_path / "runs").mkdir()
    script = tmp_path / "train_gpt.py"
    record = tmp_path / "env.json"
    env = {**clean_environ(), "ENV_RECORD": str(record), "RUN_ID": "mine", "RESUME": "runs/old"}
    script.write_text(STAND_IN.format(ttt=400.0, total=443.0, scaled=0.0))
    warm, budget = preflight.warm_compile(script, env, 1, cfg, 5, 60)
    assert warm.status == "PASS" and "warmup_time:12.5s" in warm.figure and "fx_cache_hits:9" in warm.figure
    assert budget == ("PASS", "eval budget", "the run's own estimate: 443 s on this box, 0 s at the competition's "
                                             "scale (8 GPUs), budget 600 s")
    seen = json.loads(record.read_text())
    assert (seen["ITERATIONS"], seen["TRAIN_ONLY"], seen["NCCL_NVLS_ENABLE"]) == ("5", "1", "0")
    assert "RUN_ID" not in seen and "RESUME" not in seen
    assert Path(seen["OUT_DIR"]).parent.parent == tmp_path / "runs" and not Path(seen["OUT_DIR"]).parent.exists()
    script.write_text(STAND_IN.format(ttt=100.0, total=143.0, scaled=612.0))
    assert preflight.warm_compile(script, env, 1, cfg, 5, 60)[1].status == "FAIL"  # over at the competition's scale
    script.write_text(REFUSING)
    warm, budget = preflight.warm_compile(script, env, 1, cfg, 5, 60)
    assert warm.status == budget.status == "FAIL" and budget.figure.startswith("EVAL_BUDGET_S=600: the final")
    assert preflight.warm_command(script, 8)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node=8"]


def test_the_script_on_this_cpu_machine_says_no_gpu_and_exits_1(built, tmp_path):
    env = {**clean_environ(), **tiny_env(built, OUT_DIR=tmp_path / "run")}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "preflight.py")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL gpus: no GPU") and "Traceback" not in result.stderr
    assert [line.split()[0:2] for line in lines[1:-1]] == [["PASS", "config:"], ["SKIP", "nccl:"], ["WARN", "fa3:"],
                                                            ["PASS", "data:"], ["PASS", "disk:"], ["SKIP", "eval"]]
    assert lines[-1].startswith("preflight: 3 PASS, 1 WARN, 1 FAIL, 2 SKIP in ") and "NOT ready" in lines[-1]


def test_main_passes_on_a_box_of_stand_ins_and_fails_on_a_corrupted_shard(built, tmp_path, monkeypatch, capsys):
    fake_gpus(monkeypatch, [H100] * 8)
    fake_fa3(monkeypatch, lambda q, k, v, causal: sdpa_float32(q, k, v, causal).bfloat16())
    monkeypatch.setattr(preflight, "fa3_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(preflight, "measure_allreduce", lambda *a, **k: dict(seconds=1e-3, correct=True,
                                                                              busbw_gbs=380.0))
    data = copy_of(built, tmp_path)
    env = tiny_env(data, OUT_DIR=tmp_path / "run", TRAIN_BATCH_TOKENS=8 * 64 * 2)
    monkeypatch.setattr(preflight.os, "environ", env)
    assert preflight.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\nPASS ") + out.startswith("PASS ") == 7 and "0 FAIL" in out, out
    assert "fa3 numerics: B=2 T=64 heads=2/1 dim=32" in out  # the run's shapes: 2 sequences per GPU, TRAIN_SEQ_LEN
    flip_a_token(data / "fineweb_val_000000.bin")
    assert preflight.main([]) == 1 and "FAIL data:" in capsys.readouterr().out
    env["NUM_LAYERZ"] = "3"
    assert preflight.main([]) == 1 and "FAIL config: NUM_LAYERZ: unknown variable" in capsys.readouterr().out


@pytest.mark.parametrize("argv, line", [
    (["--nccl-timeout", "-1"], "error: --nccl-timeout -1: must be a finite number above 0 seconds"),
    (["--warm-timeout", "0"], "error: --warm-timeout 0: must be a finite number above 0 seconds"),
    (["--min-busbw", "-3"], "error: --min-busbw -3: must be a finite number >= 0 GB/s"),
    (["--nccl-timeout", "inf"], "error: --nccl-timeout inf: must be a finite number above 0 seconds"),
    (["--warm-timeout", "inf"], "error: --warm-timeout inf: must be a finite number above 0 seconds"),  # OverflowError
    (["--min-busbw", "inf"], "error: --min-busbw inf: must be a finite number >= 0 GB/s"),  # every box would FAIL
])
def test_timeouts_and_the_bandwidth_floor_are_refused_when_they_cannot_mean_anything(capsys, argv, line):
    with pytest.raises(SystemExit) as stop:
        preflight.parse_args(argv)
    assert stop.value.code == 2 and line in capsys.readouterr().err
