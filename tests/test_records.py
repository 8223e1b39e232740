"""From seed runs to a records folder: the log header, scripts/make_record.py, runs_table.py and
the Welch test (scripts/welch.py), on real tiny CPU runs and copies of their logs altered the way
reviewers find them (another setting, other code, unfinished, over the cap, over time)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import PLAIN_SHAPE, ROOT, run_script, tiny_env

sys.path.insert(0, str(ROOT / "scripts"))
import eval_probes  # noqa: E402
import make_record  # noqa: E402
import train_gpt  # noqa: E402
import welch  # noqa: E402
from runlog import RunLog, read_log  # noqa: E402

# one worker for the module under `pytest -n 2 --dist loadgroup`: its fixture (five runs) is built once
pytestmark = pytest.mark.xdist_group("records")
SEEDS = (1, 2, 3)
FAST = dict(ITERATIONS=6, TRAIN_LOG_EVERY=2, EVAL_STRIDE=32, MIX_ETA=1, MIX_BUCKETS=4096)  # the default mixed score


@pytest.fixture(scope="module")
def seed_runs(small_data, tmp_path_factory) -> Path:
    """Three seeds of one tiny setting, an EVAL_ONLY rescoring of the first, and a seed run by the
    packed wrapper that pack_record.py writes: runs/<RUN_ID>/ under the returned folder."""
    cwd = tmp_path_factory.mktemp("seeds")
    for seed in SEEDS:
        result = run_script(tiny_env(small_data, RUN_ID=f"seed{seed}", SEED=seed, **FAST), cwd)
        assert result.returncode == 0, result.stderr[-3000:]
    artifact = next((cwd / "runs" / "seed1").glob("final_model.*.ptz"))
    result = run_script(tiny_env(small_data, RUN_ID="rescore", EVAL_ONLY=artifact, **FAST), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    wrapper = cwd / "packed" / "train_gpt.py"
    wrapper.parent.mkdir()
    wrapper.write_text(train_gpt.pack_code((ROOT / "train_gpt.py").read_bytes()), encoding="utf-8")
    result = run_script(tiny_env(small_data, RUN_ID="packed", SEED=4, **FAST), cwd, script=wrapper)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def summaries(cwd: Path) -> list[dict]:
    return [read_log(cwd / "runs" / f"seed{s}").summary for s in SEEDS]


def make(cwd: Path, out: Path, *runs, extra=()) -> subprocess.CompletedProcess:
    paths = [str(cwd / "runs" / r) if not Path(r).is_absolute() else str(r) for r in runs]
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_record.py"), *paths, "--name", "Tiny_CPU",
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_log_header_names_what_reviewers_ask_for(seed_runs, small_data):
    run = read_log(seed_runs / "runs" / "seed1")
    code = (ROOT / "train_gpt.py").read_bytes()
    assert (run.code_sha256, run.code_bytes, run.code_file) == (hashlib.sha256(code).hexdigest(), len(code),
                                                                 "train_gpt.py")
    assert run.source == code  # the embedded source, byte for byte
    tokens = sum(int.from_bytes(p.read_bytes()[8:12], "little") for p in small_data.glob("fineweb_train_*.bin"))
    assert run.header == dict(torch_version=torch.__version__, cuda_version=str(torch.version.cuda),
                              attention_backend="sdpa", world_size="1", gpu_count="0", gpu="none", train_shards="2",
                              train_shard_tokens=str(tokens))


@pytest.mark.slow
def test_record_from_three_seeds(seed_runs, tmp_path):
    out = tmp_path / "record"
    result = make(seed_runs, out, *(f"seed{s}" for s in SEEDS),
                  extra=("--track", "non_record_16mb", "--against", "3.9,3.95,3.92", "--author", "A. Golfer"))
    assert result.returncode == 0, result.stderr
    sub = json.loads((out / "submission.json").read_text())
    runs = summaries(seed_runs)
    scores = [s["val_bpb"] for s in runs]
    assert sub["val_bpb"] == pytest.approx(statistics.mean(scores), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(scores), abs=1e-8)
    assert sub["val_loss"] == pytest.approx(statistics.mean(s["val_loss"] for s in runs), abs=1e-8)
    assert sub["bytes_total"] == max(s["bytes_total"] for s in runs)
    shipped = (seed_runs / "runs" / "seed1" / "train_gpt.py").read_bytes()  # the packed file each seed shipped
    assert sub["bytes_code"] == len(shipped) == runs[0]["bytes_code"] < (ROOT / "train_gpt.py").stat().st_size / 3
    assert sub["seeds"] == list(SEEDS) and list(sub["seed_results"]) == ["1", "2", "3"]
    assert sub["seed_results"]["2"]["val_bpb"] == runs[1]["val_bpb"] and sub["seed_results"]["2"]["steps"] == 6
    assert (sub["hardware"], sub["pytorch_version"], sub["train_shards"]) == ("CPU (1 process)", torch.__version__, 2)
    assert sub["compliance"]["artifact_under_16mb"] and sub["compliance"]["score_before_update"]
    assert sub["statistics"]["previous_val_bpb"] == [3.9, 3.95, 3.92] and sub["statistics"]["p"] < 0.25
    ratio = statistics.mean(s["val_loss"] / s["val_bpb"] for s in runs)  # nats per bpb = ln 2 x bytes/token
    assert sub["statistics"]["nats_per_bpb"] == pytest.approx(ratio) == welch.nats_per_bpb(str(out))
    # the shipped code (the packed file the seeds shipped, holding this repository's program) and logs (named as
    # upstream names them), byte for byte
    assert (out / "train_gpt.py").read_bytes() == shipped
    assert train_gpt.unpack_code(shipped) == train_gpt.code_only((ROOT / "train_gpt.py").read_bytes())
    for s in SEEDS:
        log = seed_runs / "runs" / f"seed{s}" / f"seed{s}.txt"
        assert (out / f"train_seed{s}.log").read_bytes() == log.read_bytes()
    readme = (out / "README.md").read_text()
    assert f"| 2 | {runs[1]['val_bpb']:.8f} |" in readme and "one-sided Welch t-test" in readme
    assert "(`final_int8_brotli_sliding_mix`)" in readme and "## The n-gram mixer" in readme
    assert "hashed-trigram experts counted from already-scored targets only" in sub["compliance"]["evaluation"]
    assert sub["compliance"]["causal"]["evaluations"] == ["roundtrip", "sliding_mix"]  # probed, both
    assert sub["compliance"]["hashed_ngram_cache"] and not sub["compliance"]["no_ngram_cache"]
    command = re.search(r"```bash\n(.*?)\n```", readme, re.S)[1]
    assert command.startswith("SEED=1 ") and command.endswith("python3 train_gpt.py")
    assert "ITERATIONS=6" in command and "MODEL_DIM=64" in command and "RUN_ID" not in command
    again = make(seed_runs, out, *(f"seed{s}" for s in SEEDS), extra=("--track", "non_record_16mb"))
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_a_packed_wrapper_run_ships_the_wrapper(seed_runs, tmp_path):
    out = tmp_path / "packed_record"
    result = make(seed_runs, out, "packed", extra=("--track", "non_record_16mb"))
    assert result.returncode == 0, result.stderr
    shipped = (out / "train_gpt.py").read_bytes()
    assert shipped == (seed_runs / "packed" / "train_gpt.py").read_bytes()
    assert train_gpt.unpack_code(shipped) == train_gpt.code_only((ROOT / "train_gpt.py").read_bytes())
    assert json.loads((out / "submission.json").read_text())["bytes_code"] == len(shipped)


def altered_log(cwd: Path, tmp_path: Path, change) -> Path:
    """A copy of seed 2's log, changed, in a run folder of its own."""
    text = (cwd / "runs" / "seed2" / "seed2.txt").read_text(encoding="utf-8")
    folder = tmp_path / "altered"
    folder.mkdir()
    (folder / "altered.txt").write_text(change(text), encoding="utf-8")
    (folder / "train_gpt.py").write_bytes((cwd / "runs" / "seed2" / "train_gpt.py").read_bytes())  # what it shipped
    return folder


def with_summary(**fields):
    def change(text: str) -> str:
        line = re.search(r"^final_summary (.*)$", text, re.M)
        return text.replace(line[0], "final_summary " + json.dumps({**json.loads(line[1]), **fields}))
    return change


@pytest.mark.slow
@pytest.mark.parametrize("change, track, reason", [
    (lambda t: t.replace('"matrix_lr": 0.026', '"matrix_lr": 0.03', 1), "non_record_16mb",
     "the logs differ in MATRIX_LR: 0.026 (seed1.txt), 0.03 (altered.txt)"),
    (lambda t: re.sub(r"(?m)^code_sha256:[0-9a-f]{64}", "code_sha256:" + "0" * 64, t), "non_record_16mb",
     "altered.txt: the source it embeds does not hash to its code_sha256"),
    (lambda t: t[:t.index("\nfinal_summary ")], "non_record_16mb", "altered.txt: not a finished run"),
    (with_summary(bytes_model=16_000_000, bytes_total=16_000_000 + (ROOT / "train_gpt.py").stat().st_size),
     "non_record_16mb", "over the 16,000,000 byte cap"),
    (with_summary(train_time_ms=600_500), "10min_16mb", "training took 600.5 s, over the 600 s limit"),
])
def test_refusals_name_the_file_and_the_reason(seed_runs, tmp_path, change, track, reason):
    altered = altered_log(seed_runs, tmp_path, change)
    out = tmp_path / "record"
    result = make(seed_runs, out, "seed1", altered, extra=("--track", track))
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert reason in result.stderr, result.stderr


@pytest.mark.slow
def test_other_refusals(seed_runs, tmp_path):
    wrong_code = make(seed_runs, tmp_path / "a", "seed1", "seed2", extra=("--code", str(ROOT / "README.md")))
    assert wrong_code.returncode == 2 and "--code" in wrong_code.stderr and "does not hold the program" in wrong_code.stderr
    eval_only = make(seed_runs, tmp_path / "b", "seed1", "rescore")
    assert eval_only.returncode == 2 and "rescore.txt: an EVAL_ONLY run" in eval_only.stderr
    missing = make(seed_runs, tmp_path / "c", "seed1", "nope")
    assert missing.returncode == 2 and "nope: no such file or folder" in missing.stderr


@pytest.mark.slow
def test_runs_table_shows_eval_only_runs(seed_runs):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "runs_table.py"),
                             *(str(p) for p in sorted((seed_runs / "runs").iterdir()))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"seed1", "seed2", "seed3", "rescore", "packed"}
    rescore = read_log(seed_runs / "runs" / "rescore").summary
    assert rows["rescore"].startswith("| rescore | - | - | - |")  # no training: steps, ms/step, tok/s
    assert f"| {rescore['evals']['final_int8_brotli_sliding_mix']['val_bpb']:.4f} |" in rows["rescore"]
    assert "| roundtrip bpb | sliding_mix bpb |" in result.stdout.splitlines()[0]  # each kind whole, mixed or not
    assert rescore["val_bpb"] == read_log(seed_runs / "runs" / "seed1").summary["val_bpb"]


def test_evaluation_kinds_keep_their_suffixes():
    """A column per kind: the mixed and LoRA lines are their own kinds, not 'mix' or 'lora' shared by two."""
    names = ["final_mixedgptq_brotli_roundtrip", "final_mixedgptq_brotli_sliding", "final_mixedgptq_brotli_ttt_mix",
             "final_int8_brotli_ttt_lora", "final_int6_zstd_sliding_mix", "pre_export"]
    run = RunLog(Path("x.txt"), {}, {"evals": {name: {"val_bpb": i} for i, name in enumerate(names)}})
    assert {k: e["val_bpb"] for k, e in run.evals_by_kind().items()} == dict(
        roundtrip=0, sliding=1, ttt_mix=2, ttt_lora=3, sliding_mix=4, pre_export=5)


# ---------------------------------------------------------------------------------------------
# The compliance block: what the probes of the shipped script found (fast: logs written here, no training)
# ---------------------------------------------------------------------------------------------

TINY = dict(PLAIN_SHAPE, VOCAB_SIZE="1024", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", NUM_LAYERS="2",
            TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="2048", ITERATIONS="6", GPTQ="0", EMA_HORIZON="0",
            EXPORT_WEIGHTS="last", TTT_EPOCHS="1")
ROUNDTRIP_ONLY = dict(TINY, EVAL_STRIDE="0", TTT_LR="0", MIX_ETA="0")
# Stand-ins: the repository's train_gpt.py with one thing broken, appended (through the names that stay).
LEAKY = """
_honest_evaluate = evaluate
def evaluate(model, plan, tokens, *args, **kwargs):  # the weights see the whole text (its sum) before any score
    shift = 1e-2 * float(tokens.long().sum() % 7)
    with torch.no_grad():
        next(model.parameters()).add_(shift)
    try:
        return _honest_evaluate(model, plan, tokens, *args, **kwargs)
    finally:
        with torch.no_grad():
            next(model.parameters()).sub_(shift)
"""
TWICE = """
_honest_evaluate = evaluate
def evaluate(*args, **kwargs):  # a second pass after the first: every target scored twice
    _honest_evaluate(*args, **kwargs)
    return _honest_evaluate(*args, **kwargs)
"""
UNNORMALIZED = """
class NgramMixer(NgramMixer):
    def mix(self, tokens, pos, nll):  # every token's probability times e^0.1: sums to 1.105
        return super().mix(tokens, pos, nll) - 0.1
"""
COUNTS_FIRST = """
_honest_evaluate = evaluate
def evaluate(model, plan, tokens, cfg, rank, world_size, tables, autocast, window, stride, adapter="none",
             nll_out=None, mixer=None):  # the cache of every target filled before scoring (a lookahead cache)
    if mixer is not None:
        mixer.update(tokens, 0, len(tokens) - 1, world_size)
    return _honest_evaluate(model, plan, tokens, cfg, rank, world_size, tables, autocast, window, stride, adapter,
                            nll_out, mixer)
"""


def stand_in(extra: str):
    return eval_probes.load_module((ROOT / "train_gpt.py").read_bytes() + extra.encode())


def test_the_probes_hold_for_this_train_gpt_and_say_what_they_measured():
    result = eval_probes.probe(train_gpt, dict(TINY, EVAL_STRIDE="16", TTT_LR="0.005", MIX_ETA="1"))
    assert result["passed"] and result["targets"] == 240
    assert [k["kind"] for k in result["evaluations"]] == ["roundtrip", "sliding", "ttt_mix"]
    for k in result["evaluations"]:
        assert k["single_pass"] == dict(each_target_once=True, min_writes=1, max_writes=1, loss_is_their_mean=True,
                                        one_byte_each=True, passed=True)
        assert k["causal"]["max_earlier_change_nats"] <= eval_probes.TOLERANCE_NATS and k["causal"]["change_seen"]
    mixer = result["evaluations"][-1]["mixer"]
    assert mixer["normalized"]["max_abs_sum_minus_1"] < 1e-12 and mixer["normalized"]["min_probability"] > 0
    chunks = math.ceil(240 / 48)  # PROBE_SHAPE's TTT_CHUNK
    assert mixer["score_first"] == dict(passed=True, count_updates=chunks, score_calls=mixer["score_first"][
        "score_calls"], targets_counted=240, problems=[])


@pytest.mark.parametrize("source, error", [("x = (\n", "SyntaxError"), ("import no_such_module_here\n",
                                                                        "ModuleNotFoundError")])
def test_a_code_file_that_cannot_be_imported_is_refused_in_one_line(tmp_path, capsys, source, error):
    """eval_probes.py --code FILE that does not import: one line naming --code and the file, exit 2 (a traceback)."""
    code = tmp_path / "train_gpt.py"
    code.write_text(source)
    assert eval_probes.main(["--code", str(code)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --code {code}: cannot be imported ({error}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("extra, settings, failure", [
    (LEAKY, ROUNDTRIP_ONLY, "roundtrip: not causal (changing token 3 moved the score of target "),
    (TWICE, ROUNDTRIP_ONLY, "roundtrip: not single-pass (targets written 2..2 times"),
    (UNNORMALIZED, dict(ROUNDTRIP_ONLY, MIX_ETA="1"), "roundtrip_mix: the mixer is not normalized (sums off by 0.10"),
    (COUNTS_FIRST, dict(ROUNDTRIP_ONLY, MIX_ETA="1"), "roundtrip_mix: the mixer is not score-first (['targets 0..239 "
                                                      "counted before all were scored'"),
], ids=["leaky", "twice", "unnormalized", "counts_first"])
def test_the_probes_catch_a_broken_evaluation(extra, settings, failure):
    result = eval_probes.probe(stand_in(extra), settings)
    assert not result["passed"]
    assert any(line.startswith(failure) for line in eval_probes.failures(result)), eval_probes.failures(result)
    if extra is COUNTS_FIRST:  # the lookahead cache moves earlier scores too
        assert any("roundtrip_mix: not causal" in line for line in eval_probes.failures(result))


def write_log(folder: Path, source: bytes, settings: dict, seed: int, bpb: float) -> Path:
    """A finished run's log as train_gpt.py writes it (config line, its source, header, final_summary), for
    `source` with `settings`, without training: make_record reads no more than this (scripts/runlog.py)."""
    cfg = train_gpt.build_config({**settings, "SEED": str(seed), "RUN_ID": f"seed{seed}"})
    kinds = [kind for kind, *_ in train_gpt.evaluation_windows(cfg)]
    evals = {f"final_int8_brotli_{k}": dict(val_loss=1.5 * bpb, val_bpb=bpb, eval_time_ms=900) for k in kinds}
    shipped = train_gpt.pack_code(source).encode()  # the packed file the run ships, beside its log
    summary = dict(val_bpb=bpb, val_loss=1.5 * bpb, evals=evals, bytes_code=len(shipped), bytes_model=250_000,
                   bytes_total=len(shipped) + 250_000, steps=6, train_time_ms=600, seed=seed, world_size=1,
                   score_line=f"final_int8_brotli_{kinds[-1]} val_loss:{1.5 * bpb:.4f} val_bpb:{bpb:.4f} "
                              "eval_time:900ms")
    lines = ["=" * 100, f"code_sha256:{hashlib.sha256(source).hexdigest()} code_bytes:{len(source)} "
             "code_file:train_gpt.py", f"torch_version:{torch.__version__} cuda_version:None attention_backend:sdpa "
             "world_size:1 gpu_count:0 gpu:none", "train_shards:2 train_shard_tokens:347565",
             f"shipped_code:runs/seed{seed}/train_gpt.py bytes:{len(shipped)} (packed; the source run is "
             f"{len(source)} bytes)",
             "final_summary " + json.dumps(summary, sort_keys=True)]
    path = folder / f"seed{seed}" / f"seed{seed}.txt"
    path.parent.mkdir(parents=True)
    config = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    path.write_bytes(f"config {config}\n".encode() + source + ("\n" + "\n".join(lines) + "\n").encode())
    (path.parent / "train_gpt.py").write_bytes(shipped)
    return path.parent


def make_in_process(out: Path, runs: list[Path], *extra: str, capsys=None) -> tuple[int, str]:
    code = make_record.main([*map(str, runs), "--name", "Tiny_CPU", "--out", str(out), "--track", "non_record_16mb",
                             *extra])
    return code, capsys.readouterr().err if capsys else ""


@pytest.mark.parametrize("mixed", [True, False])
def test_the_compliance_block_comes_from_the_probes_of_the_shipped_script(tmp_path, capsys, mixed):
    settings = dict(TINY, EVAL_STRIDE="16", TTT_LR="0.005", MIX_ETA="1" if mixed else "0")
    source = (ROOT / "train_gpt.py").read_bytes()
    runs = [write_log(tmp_path / "runs", source, settings, seed, 3.7 + seed / 100) for seed in SEEDS]
    out = tmp_path / "record"
    code, err = make_in_process(out, runs, "--attribution", "qk_gain=ours", capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                     "train_gpt.py", "train_seed1.log", "train_seed2.log",
                                                     "train_seed3.log"]
    sub = json.loads((out / "submission.json").read_text())
    c = sub["compliance"]
    kinds = ["roundtrip", "sliding", "ttt_mix" if mixed else "ttt"]
    assert c["causal"]["checked"] and c["causal"]["targets_probed"] == 240 and c["causal"]["evaluations"] == kinds
    assert c["causal"]["perturbed_tokens"] == list(eval_probes.PERTURB_AT) and c["causal"]["max_earlier_change_nats"] \
        <= 1e-5
    assert c["single_pass"]["targets_probed"] == 240 and c["single_pass"]["evaluations"] == kinds
    assert c["score_first_ttt"] and c["test_time_training"] == "sgd"
    assert (c["no_ngram_cache"], c["hashed_ngram_cache"], "ngram_mixer" in c) == (not mixed, mixed, mixed)
    readme = (out / "README.md").read_text()
    if mixed:
        mixer = c["ngram_mixer"]
        assert (mixer["mix_eta"], mixer["mix_buckets"], mixer["evaluation"]) == (1.0, 65536, "ttt_mix")
        assert mixer["normalized_over_vocabulary"]["max_abs_sum_minus_1"] < 1e-6 == mixer[
            "normalized_over_vocabulary"]["tolerance"]
        assert mixer["score_first"]["count_updates"] == 5 and mixer["score_first"]["targets_counted"] == 240
        assert mixer["hashed_ngram_cache"] and "PR #982" in mixer["why_it_does_not_leak"]
        assert c["normalized_distribution"]["mixture"] == mixer["normalized_over_vocabulary"]
        assert "## The n-gram mixer" in readme and "PR #1514" in readme and "MIX_ETA=0" in readme
        assert sub["attribution"]["ngram_mixer"].startswith("this repository")
    else:
        assert "## The n-gram mixer" not in readme and "no n-gram statistics are built" in readme
        assert "ngram_mixer" not in sub["attribution"]
    assert sub["attribution"]["qk_gain"] == "ours" and sub["attribution"]["legal_ttt_framework"].endswith("(PR #549)")
    assert sub["blurb"].startswith("train_gpt.py with ") and "TTT_EPOCHS=1" in sub["blurb"]  # from the settings
    assert "score-first TTT (SGD, 1 epochs)" in sub["technique_summary"] and sub["technique_summary"].startswith(
        "SP1024 + 2 blocks x 64 (2 layers)")


def test_a_non_causal_script_is_refused_and_nothing_written(tmp_path, capsys):
    source = (ROOT / "train_gpt.py").read_bytes() + LEAKY.encode()
    runs = [write_log(tmp_path / "runs", source, ROUNDTRIP_ONLY, seed, 3.7) for seed in (1, 2)]
    out = tmp_path / "record"
    code, err = make_in_process(out, runs, capsys=capsys)
    assert code == 2 and not out.exists()
    assert "error: the shipped train_gpt.py fails the compliance probes: roundtrip: not causal (changing token 3 " \
           "moved the score of target " in err and err.count("\n") == 2  # the probing note, then one error line


def test_logs_whose_evaluations_are_not_their_settings_are_refused(tmp_path, capsys):
    """A log claiming an unmixed score while its settings mix (MIX_ETA=1): no_ngram_cache would be false."""
    source = (ROOT / "train_gpt.py").read_bytes()
    runs = [write_log(tmp_path / "runs", source, ROUNDTRIP_ONLY, seed, 3.7) for seed in (1, 2)]
    log = runs[1] / "seed2.txt"
    log.write_bytes(log.read_bytes().replace(b'"mix_eta": 0.0', b'"mix_eta": 1.0'))
    first = runs[0] / "seed1.txt"
    first.write_bytes(first.read_bytes().replace(b'"mix_eta": 0.0', b'"mix_eta": 1.0'))
    code, err = make_in_process(tmp_path / "record", runs, capsys=capsys)
    assert code == 2 and "seed1.txt: its final evaluations (roundtrip) are not those its settings give " \
                         "(roundtrip_mix)" in err, err


def test_a_date_that_is_no_day_is_refused(capsys):
    """--date 2024-13-45 has the shape YYYY-MM-DD: it was written into the folder's name and submission.json."""
    with pytest.raises(SystemExit) as stop:
        make_record.parse_args(["runs/a", "--name", "x", "--date", "2024-13-45"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error: --date '2024-13-45': month must be in 1..12" in err.splitlines()[-1]
    assert make_record.parse_args(["runs/a", "--name", "x", "--date", "2024-02-29"]).date == "2024-02-29"


def test_an_empty_against_is_refused_not_ignored(tmp_path, capsys):
    """--against '' (say, an unset shell variable) was taken for no --against: the record went without its test."""
    runs = [write_log(tmp_path / "runs", (ROOT / "train_gpt.py").read_bytes(), ROUNDTRIP_ONLY, seed, 3.7 + seed / 100)
            for seed in (1, 2)]
    code, err = make_in_process(tmp_path / "record", runs, "--against", "", capsys=capsys)
    assert code == 2 and err.splitlines()[-1] == "error: '': no scores" and not (tmp_path / "record").exists()


def test_the_blurb_is_required_when_the_runs_use_the_defaults(tmp_path, capsys):
    runs = [write_log(tmp_path / "runs", (ROOT / "train_gpt.py").read_bytes(), {}, seed, 1.08) for seed in (1, 2)]
    code, err = make_in_process(tmp_path / "record", runs, capsys=capsys)
    assert code == 2 and "nothing to describe: say what this entry changes and why with --blurb TEXT" in err


# ---------------------------------------------------------------------------------------------
# The Welch test, against hand computations and t tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, df, p", [
    (1.0, 1, 0.25),  # Cauchy: P(T > 1) = 1/4 exactly
    (2.015, 5, 0.05), (2.776, 4, 0.025), (3.169, 10, 0.005), (1.645, 1e7, 0.05),  # t tables, one-sided
    (0.0, 3, 0.5), (-2.015, 5, 0.95),
])
def test_student_t_tail_matches_tables(t, df, p):
    assert welch.t_sf(t, df) == pytest.approx(p, abs=1e-4)


def test_student_t_tail_matches_closed_forms():
    for t in (0.3, 1.7, 4.2, 9.0):
        assert welch.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)  # df = 2
        u = 1 + t * t / 4  # df = 4: F(t) = 1/2 + 3/8 t/sqrt(u) (1 - t^2/(12 u))
        assert welch.t_sf(t, 4) == pytest.approx(0.5 - 3 / 8 * t / math.sqrt(u) * (1 - t * t / (12 * u)), abs=1e-12)


def test_welch_equal_variances_by_hand():
    """new 1.080, 1.081, 1.079 against 1.085, 1.087, 1.086, by hand:
    means 1.080 and 1.086, delta 0.006; both sample variances (0 + 1e-6 + 1e-6)/2 = 1e-6;
    standard error sqrt(1e-6/3 + 1e-6/3) = 8.165e-4; t = 0.006 / 8.165e-4 = 7.348;
    Welch-Satterthwaite df = (2e-6/3)^2 / (2 (1e-6/3)^2 / 2) = 4; the t table for df 4 puts 7.348
    between t(0.001) = 7.173 and t(0.0005) = 8.610, so 0.0005 < p < 0.001."""
    r = welch.welch([1.080, 1.081, 1.079], [1.085, 1.087, 1.086])
    assert r["mean_new"] == pytest.approx(1.080) and r["mean_previous"] == pytest.approx(1.086)
    assert r["t"] == pytest.approx(7.348, abs=1e-3) and r["df"] == pytest.approx(4.0)
    assert 0.0005 < r["p"] < 0.001
    judged = welch.judge(r, nats_per_bpb=2.0)  # 0.006 bpb x 2 = 0.012 nats
    assert judged["delta_nats"] == pytest.approx(0.012)
    assert judged["readme_rule"]["passes"] and judged["practice_rule"]["passes"]
    assert welch.judge(r, None)["readme_rule"]["passes"] is None  # significant, nats unknown


def test_welch_unequal_sizes_by_hand():
    """new 1.10, 1.12 (n 2) against 1.13, 1.15, 1.14, 1.16 (n 4), by hand:
    means 1.110 and 1.145, delta 0.035; variances 2e-4 and 5e-4/3 = 1.667e-4;
    a = 2e-4/2 = 1e-4, b = 1.667e-4/4 = 4.167e-5; t = 0.035 / sqrt(1.4167e-4) = 2.941;
    df = (1.4167e-4)^2 / (1e-8/1 + 1.736e-9/3) = 1.897. Between df 1 (P(T > 2.941) = 0.104) and
    df 2 (0.5 - t/(2 sqrt(t^2+2)) = 0.0494) and, df being near 2, close to the latter."""
    r = welch.welch([1.10, 1.12], [1.13, 1.15, 1.14, 1.16])
    assert r["t"] == pytest.approx(2.941, abs=1e-3) and r["df"] == pytest.approx(1.897, abs=1e-3)
    assert 0.0494 < r["p"] < 0.06
    judged = welch.judge(r, nats_per_bpb=1.0)  # 0.035 nats is enough, p is not, for the README rule
    assert not judged["readme_rule"]["passes"] and judged["practice_rule"]["passes"]
    assert welch.judge(r, None)["readme_rule"]["passes"] is False  # p alone fails it
    assert not welch.judge(welch.welch([1.2, 1.3], [1.1, 1.0]), 1.0)["practice_rule"]["passes"]  # worse


def test_previous_scores_from_published_entries(tmp_path):
    entries = {
        "a": {"seed_results": {"42": {"val_bpb": 1.081, "artifact_bytes": 1}, "314": {"bpb": 1.0805}}},
        "b": {"seed_results": [{"seed": 1, "val_bpb": 1.2}, {"seed": 2, "val_bpb": 1.3}]},
        "c": {"seeds": [1, 2], "val_bpb_seeds": [1.5, 1.6]},
    }
    for name, sub in entries.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "submission.json").write_text(json.dumps(sub))
    assert welch.load_scores(str(tmp_path / "a"))[0] == [1.081, 1.0805]
    assert welch.load_scores(str(tmp_path / "b"))[0] == [1.2, 1.3]
    assert welch.load_scores(str(tmp_path / "c" / "submission.json"))[0] == [1.5, 1.6]
    assert welch.load_scores("1.08, 1.09")[0] == [1.08, 1.09]
    for bad, message in ((str(tmp_path), "no submission.json"), ("1.0,x", "neither a records folder")):
        with pytest.raises(welch.InputError, match=message):
            welch.load_scores(bad)
    with pytest.raises(welch.InputError, match="at least 2 scores"):
        welch.welch([1.0], [1.1, 1.2])


def run_welch(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "welch.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


@pytest.mark.parametrize("value", ["0", "-2", "inf"])
def test_welch_refuses_a_conversion_to_nats_that_is_not_positive(value):
    run = run_welch("1.1,1.2,1.3", "1.2,1.3,1.4", "--nats-per-bpb", value)
    assert run.returncode == 2 and run.stdout == ""
    assert f"error: --nats-per-bpb {value}: must be a finite number above 0 (val_loss / val_bpb of the new runs)" \
        in run.stderr


@pytest.mark.parametrize("previous, line", [
    ("nan,nan", "error: 'nan,nan': nan is not a val_bpb (a positive, finite number)"),  # printed "mean nan", exit 0
    ("inf,1.2", "error: 'inf,1.2': inf is not a val_bpb (a positive, finite number)"),
    ("-1.1,-1.2", "error: '-1.1,-1.2': -1.1 is not a val_bpb (a positive, finite number)"),
    ("", "error: '': no scores"),  # was "error: : no submission.json in this folder" (the current folder)
    ("list.json", "error: {tmp}/list.json: expected a JSON object (a submission.json), not list"),  # AttributeError
    ("nan.json", "error: {tmp}/nan.json: seed_results[1]: nan is not a val_bpb (a positive, finite number)"),
])
def test_welch_refuses_scores_that_are_no_val_bpb_in_one_line(tmp_path, previous, line):
    (tmp_path / "list.json").write_text("[1.1, 1.2]")
    (tmp_path / "nan.json").write_text('{"seed_results": {"1": {"val_bpb": NaN}, "2": {"val_bpb": 1.2}}}')
    previous = str(tmp_path / previous) if previous.endswith(".json") else previous
    run = run_welch("--", "1.1,1.2,1.3", previous, cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == "" and run.stderr == line.format(tmp=tmp_path) + "\n", run.stderr
