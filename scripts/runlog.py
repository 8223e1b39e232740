"""Read a train_gpt.py log: the one parser behind runs_table.py, sweep.py and make_record.py.

A log is `runs/<RUN_ID>/<RUN_ID>.txt`. What this module relies on, and nothing else:
  * the first line, `config {json}` (the resolved configuration);
  * the script's source right after it: exactly `code_bytes` bytes, named by the header line
    `code_sha256:<hex> code_bytes:<n> code_file:<name>` that follows the environment report;
  * the other header lines of `key:value` pairs (`torch_version:`, `world_size:`, `gpu:`, ...,
    `train_shards:`), the last value of a line may contain spaces (a GPU's name);
  * `step:S/N train_loss:X train_time:Tms ...` and `step:S/N val_loss:X val_bpb:Y ...` lines;
  * `shipped_code:<path> bytes:<n> (...)`: the code file the run wrote beside its artifact and counted (the packed
    copy by default; train_gpt.py in the run folder);
  * `stopping_early: ...` and the last line, `final_summary {json}`, present only when the run
    finished (EVAL_ONLY runs have one too, with `eval_only` set and no training fields).
Anything else in the log may change without breaking the tools.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

# Settings that may differ between the seeds of one record: the seed and where things are.
PER_RUN_SETTINGS = frozenset({"seed", "run_id", "data_path", "tokenizer_path", "out_dir"})

CODE_LINE = re.compile(rb"^code_sha256:([0-9a-f]{64}) code_bytes:(\d+) code_file:(.+)$", re.M)
HEADER_KEYS = ("torch_version", "train_shards")  # first keys of the other header lines
TRAIN_LINE = re.compile(r"^step:(\d+)/\S+ train_loss:([\d.naif]+) train_time:(\d+)ms", re.M)
VAL_LINE = re.compile(r"^step:(\d+)/\S+ val_loss:([\d.naif]+) val_bpb:([\d.naif]+)", re.M)
KEY = re.compile(r"(?:^| )([a-z_0-9]+):")


class LogError(Exception):
    """A file that is not a readable train_gpt.py log; the message names the file."""


def key_values(line: str) -> dict[str, str]:
    """'a:1 b:x y' -> {'a': '1', 'b': 'x y'}: a value runs until the next ' key:'."""
    keys = list(KEY.finditer(line))
    return {m[1]: line[m.end():keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
            for i, m in enumerate(keys)}


@dataclasses.dataclass
class RunLog:
    path: Path
    config: dict
    summary: dict | None  # final_summary; None while unfinished
    code_sha256: str | None = None  # from the header line (None in logs of older scripts)
    code_bytes: int | None = None
    code_file: str | None = None
    source: bytes | None = None  # the embedded source, when it hashes to code_sha256
    header: dict = dataclasses.field(default_factory=dict)  # torch_version, gpu, train_shards, ...
    train: list = dataclasses.field(default_factory=list)  # (step, train_loss, train_time_ms)
    val: list = dataclasses.field(default_factory=list)  # (step, val_loss, val_bpb) before export
    stopping_early: str | None = None
    shipped_code: Path | None = None  # the code file the run shipped and counted, in the log's folder


    @property
    def name(self) -> str:
        return self.config.get("run_id") or self.path.stem

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def eval_only(self) -> bool:
        return bool((self.summary or {}).get("eval_only") or self.config.get("eval_only"))

    @property
    def seed(self):
        return (self.summary or {}).get("seed", self.config.get("seed"))

    @property
    def steps(self) -> int | None:
        return (self.summary or {}).get("steps")

    @property
    def step_avg_ms(self) -> float | None:
        s = self.summary or {}
        return s["train_time_ms"] / s["steps"] if s.get("steps") and "train_time_ms" in s else None

    @property
    def eval_time_ms(self) -> int:
        """All final evaluations together: what the evaluation time limit counts."""
        return sum(e.get("eval_time_ms", 0) for e in (self.summary or {}).get("evals", {}).values())

    def evals_by_kind(self) -> dict[str, dict]:
        """{'roundtrip': {...}, 'sliding': {...}, 'ttt_mix': {...}}: final_<label>_<codec>_<kind> by its kind (the
        export's name is two words: mixedgptq_brotli); TRAIN_ONLY's pre_export as it is."""
        return {name.split("_", 3)[-1] if name.startswith("final_") else name: e
                for name, e in (self.summary or {}).get("evals", {}).items()}

    def settings(self) -> dict:
        """The configuration less what may differ between seeds of one setting."""
        return {k: v for k, v in self.config.items() if k not in PER_RUN_SETTINGS}


def find_log(path: Path) -> Path:
    """The log of a run folder (`<RUN_ID>.txt`, or the one .txt that starts with `config {`), or a file."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise LogError(f"{path}: no such file or folder")
    named = path / f"{path.name}.txt"
    if named.is_file():
        return named
    logs = [p for p in sorted(path.glob("*.txt")) if p.read_bytes()[:8] == b"config {"]
    if len(logs) != 1:
        raise LogError(f"{path}: expected one train_gpt.py log (<RUN_ID>.txt) in it, found {len(logs)}")
    return logs[0]


def read_log(path: Path) -> RunLog:
    """Parse a run folder or log file; LogError naming the file when it is not a train_gpt.py log."""
    path = find_log(Path(path))
    data = path.read_bytes()
    first, _, rest = data.partition(b"\n")
    if not first.startswith(b"config {"):
        raise LogError(f"{path}: not a train_gpt.py log (the first line is not 'config {{...}}')")
    try:
        run = RunLog(path, json.loads(first[len(b"config "):]), None)
    except json.JSONDecodeError as exc:
        raise LogError(f"{path}: the config line is not valid JSON ({exc})") from None
    codes = list(CODE_LINE.finditer(data))
    if codes:  # the last one: the source itself may hold such a line
        run.code_sha256, run.code_bytes = codes[-1][1].decode(), int(codes[-1][2])
        run.code_file = codes[-1][3].decode("utf-8", "replace").strip()
        source = rest[:run.code_bytes]
        run.source = source if hashlib.sha256(source).hexdigest() == run.code_sha256 else None
        rest = rest[run.code_bytes:]
    text = rest.decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith(tuple(k + ":" for k in HEADER_KEYS)):
            run.header.update(key_values(line))
        elif line.startswith("shipped_code:"):  # the file lies beside the log, whatever the run's working folder
            run.shipped_code = path.parent / Path(line.removeprefix("shipped_code:").split(" bytes:")[0]).name
        elif line.startswith("stopping_early:"):
            run.stopping_early = line.removeprefix("stopping_early:").strip()
        elif line.startswith("final_summary {"):
            try:
                run.summary = json.loads(line.removeprefix("final_summary "))
            except json.JSONDecodeError as exc:
                raise LogError(f"{path}: the final_summary line is not valid JSON ({exc})") from None
    run.train = [(int(m[1]), float(m[2]), float(m[3])) for m in TRAIN_LINE.finditer(text)]
    run.val = [(int(m[1]), float(m[2]), float(m[3])) for m in VAL_LINE.finditer(text)]
    return run


def read_logs(paths) -> list[RunLog]:
    return [read_log(Path(p)) for p in paths]


def env_text(value) -> str:
    """A logged config value as its environment variable is spelt (booleans as 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def config_differences(runs: list[RunLog]) -> dict[str, list]:
    """Settings (less PER_RUN_SETTINGS) whose values are not the same in every run: {key: values}."""
    keys = sorted(set().union(*(r.settings() for r in runs)))
    missing = object()
    diffs = {}
    for key in keys:
        values = [r.settings().get(key, missing) for r in runs]
        if any(v != values[0] for v in values):
            diffs[key] = ["(absent)" if v is missing else v for v in values]
    return diffs
