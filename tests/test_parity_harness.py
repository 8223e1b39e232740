"""The parity harness (scripts/parity/): what it changes in the reference run must be what docs/parity.md says.
The reference script itself is never here, so its parts are checked against ours and against plain definitions:
the FA3 stand-in against masked SDPA, the shuffled windows against ours' loader, the strict TTT's windows against
the rule that no window depends on where a document ends, the patcher on a skeleton with the record's names."""

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, write_shard

import train_gpt

PARITY = ROOT / "scripts" / "parity"


def load(name: str):
    """A harness module by path, not by putting its folder on sys.path: its FA3 stand-in must not become importable
    as `flash_attn_interface` for the other tests in this process, which check what ours does without FA3."""
    spec = importlib.util.spec_from_file_location(f"parity_{name}", PARITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fa, patch_reference, ref_hooks = (load(name) for name in ("flash_attn_interface", "patch_reference", "ref_hooks"))


def documents_sdpa(q, k, v, cu):
    """The plain definition: causal attention within each segment, over a dense boolean mask."""
    doc = fa.document_ids(cu, q.size(0))
    mask = (doc[:, None] == doc[None, :]).tril()
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)


@pytest.mark.parametrize("mode", fa.MASK_MODES)
@pytest.mark.parametrize("n,starts", [(1024, [0, 3, 128, 129, 500, 1023]), (1000, [0, 384, 385, 700]), (256, [0])])
def test_varlen_stand_in_is_attention_within_documents(monkeypatch, mode, n, starts):
    """Documents starting mid-block, on a block edge, one token long, a length that is not a multiple of 128,
    cu_seqlens padded with n as the record pads it, grouped K/V heads: the stand-in equals the plain definition."""
    monkeypatch.setenv("FA_SHIM_MASK", mode)
    monkeypatch.setenv("FA_SHIM_COMPILE", "0")
    torch.manual_seed(n)
    cu = torch.tensor(starts + [n] * (64 - len(starts)), dtype=torch.int32)
    q, k, v = torch.randn(n, 4, 16), torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    y = fa.flash_attn_varlen_func(q, k, v, cu, cu, 2048, 2048, causal=True, window_size=(-1, -1))
    assert y.shape == q.shape
    assert (y - documents_sdpa(q, k, v, cu)).abs().max() < 1e-5


def test_per_block_mask_is_the_full_mask():
    """FA_SHIM_MASK=blocks builds, from each block's first and last document, the very block mask that
    create_block_mask finds by visiting every pair of positions: the same partial and full block lists."""
    n = 1280
    cu = torch.tensor([0, 100, 128, 640, 641, 900, 1280] + [n] * 57, dtype=torch.int32)
    blocks, full = (fa.document_block_mask(cu, n, mode) for mode in ("blocks", "full"))

    def listed(mask, side):  # each row's blocks, as sets: the order within a row is free
        counts, order = getattr(mask, f"{side}_num_blocks"), getattr(mask, f"{side}_indices")
        return [sorted(order[0, 0, i, : counts[0, 0, i]].tolist()) for i in range(counts.shape[-1])]

    for side in ("kv", "full_kv", "q", "full_q"):  # the q side is what the backward reads
        assert listed(blocks, side) == listed(full, side), side
    assert torch.equal(blocks.to_dense(), full.to_dense())
    with pytest.raises(ValueError, match="FA_SHIM_MASK='rows'"):
        os.environ["FA_SHIM_MASK"] = "rows"
        try:
            fa.mask_mode()
        finally:
            del os.environ["FA_SHIM_MASK"]


def test_dense_stand_in_is_causal_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 64, 4, 16), torch.randn(2, 64, 2, 16), torch.randn(2, 64, 2, 16)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    assert torch.allclose(fa.flash_attn_func(q, k, v, causal=True), expected.transpose(1, 2), atol=1e-6)


def test_varlen_stand_in_lowers_in_an_evaluation_graph(monkeypatch):
    """The record's evaluation compiles its model (fullgraph, static shapes) and calls it without gradients, with
    cu_seqlens made outside the graph. Inductor must lower the stand-in there, on the block tables of its op, and
    give what the uncompiled model gives. (Block tables built from traced operations failed to lower in such a
    graph: on an H100 and, with another lowering error, on the CPU too.)"""
    monkeypatch.setenv("FA_SHIM_MASK", "blocks")
    torch.manual_seed(0)
    heads, kv_heads, dim, n = 4, 2, 16, 512

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, (heads + 2 * kv_heads) * dim, bias=False)
            self.out = torch.nn.Linear(heads * dim, 32, bias=False)

        def forward(self, x, cu):
            q, k, v = self.qkv(x).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
            q, k, v = q.view(n, heads, dim), k.view(n, kv_heads, dim), v.view(n, kv_heads, dim)
            y = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)
            return self.out(y.reshape(n, heads * dim))

    model, x = Model(), torch.randn(n, 32)
    cu = torch.tensor([0, 5, 128, 300] + [n] * 61, dtype=torch.int32)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(x, cu)
        monkeypatch.setenv("FA_SHIM_COMPILE", "0")
        assert (compiled - model(x, cu)).abs().max() < 1e-5


def test_shuffled_windows_are_ours_in_order(tmp_path, monkeypatch):
    """The reference fed by REF_LOADER=shuffled reads, at its 48 windows a micro-step, the very windows ours reads
    at its 64, in the same order, for the same seed: the stream does not depend on the micro-batch. Its segments
    are ours' with DOC_MASK=1 (each window, each BOS in one), BOSes included here."""
    tokens = np.random.default_rng(1).integers(2, 1000, size=40_000)
    tokens[::997] = train_gpt.BOS_ID
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    monkeypatch.setenv("REF_OURS_SCRIPT", str(ROOT / "train_gpt.py"))
    monkeypatch.setenv("REF_LOADER", "shuffled")
    namespace = {"BOS_ID": None}
    ref_hooks.install(namespace)
    h = SimpleNamespace(train_seq_len=32, train_batch_tokens=8 * 48 * 32, world_size=1, grad_accum_steps=8, rank=0,
                        datasets_dir=str(tmp_path), seed=7)
    loader = namespace["DocumentPackingLoader"](h, torch.device("cpu"))
    theirs = [loader.next_batch(h.train_batch_tokens, 8) for _ in range(4)]  # 192 windows
    ours = train_gpt.ShuffledLoader([tmp_path / "fineweb_train_000000.bin"], 0, 1, 64, 32, torch.device("cpu"), 7)
    ours_x, ours_y = (torch.cat(t) for t in zip(*(ours.next_batch() for _ in range(3))))  # 192 windows
    assert torch.equal(torch.cat([x for x, *_ in theirs]).reshape(-1, 32), ours_x)
    assert torch.equal(torch.cat([y for _, y, *_ in theirs]).reshape(-1, 32), ours_y)
    for x, _, cu, max_seqlen in theirs:
        assert x.shape == (1, 48 * 32) and max_seqlen == 32 and len(cu) % 64 == 0
        assert torch.equal(cu, train_gpt.varlen_segments(x.reshape(48, 32)))


def test_loader_needs_ours(monkeypatch):
    monkeypatch.setenv("REF_OURS_SCRIPT", "")
    with pytest.raises(FileNotFoundError, match="REF_OURS_SCRIPT"):
        ref_hooks.load_ours()


@pytest.mark.parametrize("pred_len", [1, 47, 48, 49, 2047, 2048, 2049, 3000, 5000])
def test_strict_windows_cover_each_target_once_and_ignore_the_end(pred_len):
    """REF_TTT_STRICT: chunk ci's window (and so every score in it) is the one a longer document would give it, so a
    document boundary later in the stream moves no earlier score; the chunks still score every target once, each
    within a window of at most eval_seq_len tokens that ends where the chunk ends."""
    chunk, context = 48, 2048
    chunks = (pred_len + chunk - 1) // chunk
    scored = []
    for ci in range(chunks):
        start, length, offset, count = ref_hooks.whole_chunk_window(ci, pred_len, chunks, chunk, context)
        longer = ref_hooks.whole_chunk_window(ci, 10**6, 10**6 // chunk + 1, chunk, context)
        assert (start, offset) == longer[::2] and count <= longer[3]
        assert 0 < length <= context and offset + count == length
        scored += range(start + offset, start + offset + count)
    assert scored == list(range(pred_len))


def test_strict_batches_are_consecutive_documents():
    docs = [(i, (10 * i, 5 + (i * 37) % 11)) for i in range(150)]
    batches = ref_hooks.stream_order_batches(docs, SimpleNamespace(ttt_batch_size=64))
    assert [i for i, _ in batches] == [0, 1, 2]
    assert [d for _, batch in batches for d in batch] == docs


def test_hooks_are_off_unless_set(monkeypatch):
    for name in ("REF_CU_BUCKETS", "REF_RESET_MOMENTUM", "REF_SKIP_LAST_VAL", "REF_TTT_EAGER", "REF_LOADER"):
        monkeypatch.delenv(name, raising=False)
    meta = [{"shard_mom": torch.ones(3)}]
    optimizers = SimpleNamespace(optimizer_muon=SimpleNamespace(_built=True, _bank_meta=meta))
    namespace = {"DocumentPackingLoader": "theirs", "_compute_chunk_window": "theirs"}
    ref_hooks.install(namespace)
    ref_hooks.after_warmup_restore(optimizers)
    assert namespace == {"DocumentPackingLoader": "theirs", "_compute_chunk_window": "theirs"}
    assert meta[0]["shard_mom"].sum() == 3 and ref_hooks.warmup_cu_buckets((64, 128)) == (64, 128)
    assert ref_hooks.should_validate(True, True) and ref_hooks.ttt_warmup_sizes([64]) == [64]
    monkeypatch.setenv("REF_RESET_MOMENTUM", "1")
    monkeypatch.setenv("REF_SKIP_LAST_VAL", "1")
    monkeypatch.setenv("REF_CU_BUCKETS", "64")
    ref_hooks.after_warmup_restore(optimizers)
    assert meta[0]["shard_mom"].sum() == 0 and ref_hooks.warmup_cu_buckets((64, 128)) == (64,)
    assert not ref_hooks.should_validate(True, True) and ref_hooks.should_validate(True, False)
    monkeypatch.setenv("REF_CU_BUCKETS", "64,x")
    with pytest.raises(ValueError, match="REF_CU_BUCKETS='64,x'"):
        ref_hooks.warmup_cu_buckets((64,))
    monkeypatch.setenv("REF_TTT_EAGER", "yes")
    with pytest.raises(ValueError, match="REF_TTT_EAGER='yes'"):
        ref_hooks.ttt_warmup_sizes([64])


# A skeleton with the record's names where the hooks go (names only: the record's code is never in the project).
SKELETON = '''import os

def train_model(h, device, val_data):
    if h.warmup_steps > 0:
        initial_optimizer_states = [1]
        warmup_cu_buckets = tuple(
            64 * i for i in range(1, 5))
        for (opt, state) in zip(optimizers, initial_optimizer_states):
            opt.load(state)
        optimizers.zero_grad_all()
    while True:
        should_validate = (last_step or
            False)

def train_and_eval(h, device):
    ttt_eval_only = False
    eval_model = deserialize(h, device)
    if h.ttt_enabled:
        fwd_ttt_compiled = _fwd_ttt
        warmup_bszes = [h.ttt_batch_size]

if __name__ == "__main__":
    main()
'''


def test_patch_adds_one_line_after_each_place():
    patched, report = patch_reference.patch(SKELETON)
    added = [line for line in patched.splitlines() if "_bench" in line]
    assert len(report) == len(added) == len(patch_reference.HOOKS)
    assert [line for line in patched.splitlines() if "_bench" not in line] == SKELETON.splitlines()
    lines = patched.splitlines()
    follows = {  # an added line: the record's line before it
        "import ref_hooks as _bench": None,
        "        warmup_cu_buckets = _bench.warmup_cu_buckets(warmup_cu_buckets)": "            64 * i for i in range(1, 5))",
        "        _bench.after_warmup_restore(optimizers)": "            opt.load(state)",
        "        should_validate = _bench.should_validate(should_validate, last_step)": "            False)",
        "    _bench.score_loaded(h, device, val_data, eval_model, ttt_eval_only)": "    eval_model = deserialize(h, device)",
        "        fwd_ttt_compiled = _bench.ttt_forward(fwd_ttt_compiled, _fwd_ttt_inner)": "        fwd_ttt_compiled = _fwd_ttt",
        "        warmup_bszes = _bench.ttt_warmup_sizes(warmup_bszes)": "        warmup_bszes = [h.ttt_batch_size]",
        "_bench.install(globals())": "",
    }
    for line, before in follows.items():
        at = next(i for i, x in enumerate(lines) if x.split("  #")[0] == line)
        assert (lines[at - 1] if at else None) == before, line
    assert lines[lines.index("_bench.install(globals())") + 1] == 'if __name__ == "__main__":'


@pytest.mark.parametrize(
    "edit,message",
    [
        (("    eval_model = deserialize(h, device)\n", ""), "0 assignment to `eval_model` in train_and_eval()"),
        (("fwd_ttt_compiled = _fwd_ttt\n", "fwd_ttt_compiled = _fwd_ttt\n        fwd_ttt_compiled = 1\n"),
         "2 assignment to `fwd_ttt_compiled`"),
        (("def train_model(", "def train_the_model("), "no single top-level function train_model()"),
        (("    eval_model = deserialize", "    x = 1; eval_model = deserialize"), "shares its line"),
    ],
)
def test_patch_names_what_is_missing(edit, message, tmp_path):
    """A script other than the record's is refused with one line naming the function and the statement, and
    nothing is written."""
    source = SKELETON.replace(*edit)
    with pytest.raises(patch_reference.PatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        patch_reference.patch(source)
    (tmp_path / "train_gpt.py").write_text(source)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(PARITY / "patch_reference.py"), str(tmp_path / "train_gpt.py"),
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_patch_writes_beside_its_modules(tmp_path):
    (tmp_path / "train_gpt.py").write_text(SKELETON)
    result = subprocess.run([sys.executable, str(PARITY / "patch_reference.py"), str(tmp_path / "train_gpt.py"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "differs from the published record" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flash_attn_interface.py", "ref_hooks.py",
                                                                   "train_gpt.py"]
    result = subprocess.run([sys.executable, str(PARITY / "patch_reference.py"), str(tmp_path / "train_gpt.py"),
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "OUT_DIR" in result.stderr and (tmp_path / "train_gpt.py").read_text() == SKELETON


def test_patch_writes_into_no_file_and_over_no_file(tmp_path):
    """OUT_DIR on a file (FileExistsError, NotADirectoryError) or holding a train_gpt.py already (overwritten: a
    checkout's own): one line naming OUT_DIR, exit 2, the file as it was."""
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "train_gpt.py").write_text(SKELETON)
    (tmp_path / "file").write_text("keep")
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "train_gpt.py").write_text("ours")
    for out, says in (
        (tmp_path / "file", "File exists"),
        (tmp_path / "file" / "sub", "Not a directory"),
        (tmp_path / "checkout", "already holds train_gpt.py; choose a new folder"),
    ):
        result = subprocess.run(
            [sys.executable, str(PARITY / "patch_reference.py"), str(tmp_path / "record" / "train_gpt.py"), str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"patch_reference: OUT_DIR {out}") and says in result.stderr
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "checkout" / "train_gpt.py").read_text() == "ours"
    assert sorted(p.name for p in (tmp_path / "checkout").iterdir()) == ["train_gpt.py"]


STUBS = "".join(f"def {name}(*args, **kwargs):\n    pass\n" for name in (
    "_build_cu_seqlens", "get_next_multiple_of_n", "_find_docs", "_build_ttt_global_batches", "_init_batch_counter",
    "_claim_next_batch", "_compute_chunk_window", "_accumulate_bpb", "_loss_bpb_from_sums", "_add_to_counter",
    "_init_int64_counter", "_select_ttt_doc_entries", "train_val_ttt_global_sgd_distributed", "eval_val_ttt_phased",
)) + "class BatchedLinearLoRA:\n    pass\nclass BatchedTTTLoRA:\n    pass\n"  # fmt: skip


@pytest.mark.parametrize(
    "source, says",
    [
        (b"x = (\n", "not Python: '(' was never closed"),  # the line named no file
        (b"\xb0\xff\n", "not Python: 'utf-8' codec can't decode"),
        (STUBS.encode(), "its eval_val_ttt_phased scored no target"),  # "0 of 45 earlier targets moved", exit 0
    ],
    ids=["syntax_error", "not_utf8", "scores_nothing"],
)
def test_check_ttt_order_names_a_script_it_cannot_check(tmp_path, source, says):
    script = tmp_path / "train_gpt.py"
    script.write_bytes(source)
    result = subprocess.run(
        [sys.executable, str(PARITY / "check_ttt_order.py"), str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"check_ttt_order: RECORD_SCRIPT {script}: ") and says in result.stderr


def run_ref(args, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("REF_", "CASEOPS"))}
    return subprocess.run(["bash", str(PARITY / "run_ref.sh"), *args], capture_output=True, text=True,
                          env={**environ, "OUT": str(tmp_path / "out"), **env}, cwd=tmp_path)


def test_run_ref_scales_the_record_to_the_bench(tmp_path):
    """DRY_RUN=1 shows the settings: the constants scaled to the budget (the values of docs/parity.md's pairs) and
    the largest validation batch that scores every whole sequence (1,547 = 7 x 13 x 17 sequences: 17 a micro-step)."""
    record = tmp_path / "record"
    (record / "tokenizers").mkdir(parents=True)
    (record / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model").write_bytes(b"")
    (record / "train_gpt.py").write_text(SKELETON)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "fineweb_train_000000.bin", np.ones(5000))
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        write_shard(shards / name, np.ones(1547 * 2048 + 5))
    env = dict(REF_SCRIPT=str(record / "train_gpt.py"), CASEOPS_DIR=str(shards), DRY_RUN="1")
    for secs, ema, warm in (("300", "0.9395", "87"), ("150", "0.8786", "43")):
        result = run_ref(["parity", secs, "SEED=42"], tmp_path, **env)
        assert result.returncode == 0, result.stderr
        settings = result.stdout.splitlines()[-1].split()
        for kv in (f"EMA_DECAY={ema}", f"MUON_MOMENTUM_WARMUP_STEPS={warm}", "VAL_BATCH_TOKENS=278528",
                   "PREQUANT_ONLY=1", "REF_LOADER=shuffled", "WARMDOWN_FRAC=0.85"):
            assert kv in settings
        assert settings[-1] == "SEED=42"
    # the record runs from the caller's folder with every path it is given made absolute
    result = run_ref(["parity", "150"], tmp_path, **{**env, "CASEOPS_DIR": "shards", "REF_SCRIPT": "record/train_gpt.py"})
    settings = result.stdout.splitlines()[-1].split()
    assert f"DATA_PATH={shards}" in settings
    assert f"TOKENIZER_PATH={record}/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" in settings
    result = run_ref(["--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("Run the 2026-04-27 record's script on the golf bench")
    other = tmp_path / "other"
    (other / "tokenizers").mkdir(parents=True)
    (other / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model").write_bytes(b"")
    (other / "train_gpt.py").write_text("print('not the record')\n")
    for args, extra, message in (
        (["parity", "300"], {"REF_SCRIPT": str(other / "train_gpt.py")}, "is it the 2026-04-27 record's?"),
        (["fast", "300"], {}, "MODE 'fast'"),
        (["parity", "5m"], {}, "SECONDS '5m'"),
        (["parity", "300", "seed"], {}, "'seed': expected VAR=VALUE"),
        (["parity", "300"], {"REF_SCRIPT": str(tmp_path / "nope.py")}, "REF_SCRIPT="),
        (["parity", "300"], {"CASEOPS_DIR": str(record)}, "no fineweb_val_bytes_"),
    ):
        result = run_ref(args, tmp_path, **{**env, **extra})
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_strict_last_batch_takes_the_full_batch_rows():
    """REF_TTT_STRICT: adapters built for the stream's last, smaller batch start as its documents' rows would in a
    full batch (after reset(): A kept warm, B zero), not as fresh draws shaped by how many documents follow."""

    class Adapter(torch.nn.Module):  # the record's batched LoRA, reduced to what the replacement touches
        def __init__(self, bsz):
            super().__init__()
            self.A, self.B = torch.nn.Parameter(torch.randn(bsz, 2, 3)), torch.nn.Parameter(torch.zeros(bsz, 3, 2))

    class Batched(torch.nn.Module):
        def __init__(self, bsz, model, rank, k_lora=True):
            super().__init__()
            self.bsz, self.head, self.q = bsz, Adapter(bsz), torch.nn.ModuleList([Adapter(bsz), Adapter(bsz)])

        def reset(self):
            for module in self.modules():
                if isinstance(module, Adapter):
                    module.B.data.zero_()

    lora_class = ref_hooks.rows_of_the_full_batch(Batched)
    full = lora_class(4, None, 2, k_lora=True)
    for p in full.parameters():
        p.data.add_(1.0)  # as training leaves them
    last = lora_class(3, None, 2)
    assert last.bsz == 3 and lora_class.full is full
    for mine, theirs in zip(last.parameters(), full.parameters()):
        assert torch.equal(mine, theirs[:3])
    assert all(p.abs().sum() == 0 for name, p in last.named_parameters() if name.endswith("B"))
    assert lora_class(4, None, 2) is lora_class.full  # a new full-size set (a new phase) becomes the source
