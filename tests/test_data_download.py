"""data/cached_challenge_fineweb.py against a real HTTP server on 127.0.0.1.

The server imitates the Hugging Face Hub closely enough for the downloader: dataset files
under /datasets/<repo>/resolve/<revision>/<path>, large files (.bin, .model) answered with
a 302 to a CDN path plus X-Linked-Size / X-Linked-Etag (their sha256), Range requests, and a
bearer token check. It can be told to drop a connection half-way through a file once and to
flip a byte of a file (once, or every time). HF_ENDPOINT points the tool at it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOWNLOAD = REPO / "data" / "cached_challenge_fineweb.py"
SP1024 = REPO.parent / "shared" / "corpus" / "tokenizers" / "fineweb_1024_bpe.model"
REPO_ID = "golfer/fake-golf"
TOKEN = "hf_test_token_123"
SHARD_DIR = "datasets/fineweb10B_sp1024"

pytestmark = pytest.mark.skipif(not SP1024.is_file(), reason="shared corpus tokenizers (../shared/corpus) not present")


def shard_bytes(count: int, seed: int) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, count)
    tokens = np.random.default_rng(seed).integers(0, 1024, size=count, dtype=np.uint16)
    return header.tobytes() + tokens.astype("<u2").tobytes()


def make_repo() -> dict[str, bytes]:
    """Remote files, by path inside the repo's export folder `datasets/`."""
    files = {
        f"{SHARD_DIR}/fineweb_val_000000.bin": shard_bytes(40_000, 0),
        **{f"{SHARD_DIR}/fineweb_train_{i:06d}.bin": shard_bytes(150_000 + i, i + 1) for i in range(3)},
        "tokenizers/fineweb_1024_bpe.model": SP1024.read_bytes(),
        "tokenizers/fineweb_1024_bpe.vocab": SP1024.with_suffix(".vocab").read_bytes(),
    }
    vocab = files["tokenizers/fineweb_1024_bpe.vocab"]
    manifest = {
        "datasets": [
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "path": SHARD_DIR,
                "stats": {"files_train": 3, "files_val": 1, "tokens_val": 40_000},
            }
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "kind": "sentencepiece_bpe",
                "vocab_size": 1024,
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
        # the .vocab is a small (non-LFS) file: the Hub sends no sha256 for it, the manifest does
        "files": [{"path": "tokenizers/fineweb_1024_bpe.vocab", "bytes": len(vocab),
                   "sha256": hashlib.sha256(vocab).hexdigest()}],
    }
    files["manifest.json"] = json.dumps(manifest, indent=1).encode()
    return {f"datasets/{path}": data for path, data in files.items()}


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = make_repo()
        self.log: list[dict] = []
        self.drop_once: set[str] = set()
        self.corrupt: dict[str, str] = {}  # path -> "once" | "always"
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self.handle_request(send_body=False)

    def do_GET(self):
        self.handle_request(send_body=True)

    def handle_request(self, send_body: bool):
        with self.server.lock:
            self.server.log.append({"method": self.command, "path": self.path,
                                    "range": self.headers.get("Range"), "auth": self.headers.get("Authorization")})
        resolve = re.fullmatch(rf"/datasets/{REPO_ID}/resolve/main/(.+)", self.path)
        cdn = re.fullmatch(r"/cdn/(.+)", self.path)
        if resolve:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.reply(401, b"unauthorized", send_body)
            path = resolve.group(1)
            if path not in self.server.files:
                return self.reply(404, b"entry not found", send_body)
            if path.endswith((".bin", ".model")):  # LFS-like: redirect, announce size and sha256
                data = self.server.files[path]
                self.send_response(302)
                self.send_header("Location", f"/cdn/{path}")
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", "0")
                return self.end_headers()
            return self.serve(path, send_body)
        if cdn and cdn.group(1) in self.server.files:
            return self.serve(cdn.group(1), send_body)
        return self.reply(404, b"no such path", send_body)

    def reply(self, code: int, body: bytes, send_body: bool):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def serve(self, path: str, send_body: bool):
        data = self.server.files[path]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = self.tampered(path, data)[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not send_body:
            return
        with self.server.lock:
            drop = path in self.server.drop_once and self.command == "GET"
            self.server.drop_once.discard(path)
        if drop:  # announce the whole body, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def tampered(self, path: str, data: bytes) -> bytes:
        with self.server.lock:
            mode = self.server.corrupt.get(path)
            if mode == "once":
                del self.server.corrupt[path]
        if not mode:
            return data
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        return bytes(flipped)


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def download(hub: FakeHub, local: Path, *args, token: str | None = TOKEN, timeout: float = 60,
             repo_id: str | None = REPO_ID, endpoint: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MATCHED_FINEWEB_"))}
    env.update(HF_ENDPOINT=endpoint or hub.endpoint, HF_HOME=str(local.parent / "hf_home"),
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    if repo_id:
        env["MATCHED_FINEWEB_REPO_ID"] = repo_id
    if token:
        env["HF_TOKEN"] = token
    variant = [] if "--variant" in args else ["--variant", "sp1024"]  # the fake hub publishes sp1024 only
    command = [sys.executable, str(DOWNLOAD), "--local-dir", str(local), "--retry-wait", "0", "--timeout", "10",
               *variant, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def expected_local(hub: FakeHub, train_shards: int) -> dict[str, bytes]:
    wanted = {f"{SHARD_DIR}/fineweb_val_000000.bin", "tokenizers/fineweb_1024_bpe.model",
              "tokenizers/fineweb_1024_bpe.vocab", "manifest.json"}
    wanted |= {f"{SHARD_DIR}/fineweb_train_{i:06d}.bin" for i in range(train_shards)}
    return {p: hub.files[f"datasets/{p}"] for p in wanted}


def local_files(local: Path) -> dict[str, bytes]:
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}


def gets_of(hub: FakeHub, name: str) -> list[dict]:
    return [r for r in hub.log if r["method"] == "GET" and r["path"].endswith(name)]


def test_full_download_matches_the_repo(hub, tmp_path):
    local = tmp_path / "data"
    result = download(hub, local, "--variant", "sp1024", "--train-shards", "2")
    assert result.returncode == 0, result.stderr
    assert local_files(local) == expected_local(hub, 2)  # no .part files, no third shard
    resolves = [r for r in hub.log if "/resolve/" in r["path"]]
    assert resolves and all(r["auth"] == f"Bearer {TOKEN}" for r in resolves)


def test_repeat_run_downloads_nothing(hub, tmp_path):
    local = tmp_path / "data"
    assert download(hub, local, "--train-shards", "2").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in local.rglob("*")}
    hub.log.clear()
    result = download(hub, local, "--train-shards", "2")
    assert result.returncode == 0, result.stderr
    assert hub.log == []
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*")} == before
    assert "0 downloaded, 5 already complete" in result.stdout


def test_dropped_connection_is_resumed_with_a_range_request(hub, tmp_path):
    name = f"{SHARD_DIR}/fineweb_train_000001.bin"
    hub.drop_once.add(f"datasets/{name}")
    local = tmp_path / "data"
    result = download(hub, local, "--train-shards", "2")
    assert result.returncode == 0, result.stderr
    assert local_files(local) == expected_local(hub, 2)
    cdn_gets = gets_of(hub, "/cdn/datasets/" + name)
    half = len(hub.files[f"datasets/{name}"]) // 2
    assert [g["range"] for g in cdn_gets] == [None, f"bytes={half}-"]
    assert "fineweb_train_000001.bin: connection closed after" in result.stderr


def test_interrupted_part_file_is_resumed(hub, tmp_path):
    local = tmp_path / "data"
    name = f"{SHARD_DIR}/fineweb_val_000000.bin"
    part = local / (name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(hub.files[f"datasets/{name}"][:5000])
    result = download(hub, local, "--train-shards", "1")
    assert result.returncode == 0, result.stderr
    assert local_files(local) == expected_local(hub, 1)
    assert [g["range"] for g in gets_of(hub, "/cdn/datasets/" + name)] == ["bytes=5000-"]


def test_corrupted_byte_is_rejected_and_fetched_again(hub, tmp_path):
    name = f"{SHARD_DIR}/fineweb_train_000000.bin"
    hub.corrupt[f"datasets/{name}"] = "once"
    local = tmp_path / "data"
    result = download(hub, local, "--train-shards", "1")
    assert result.returncode == 0, result.stderr
    assert "fineweb_train_000000.bin: sha256 mismatch" in result.stderr
    assert local_files(local) == expected_local(hub, 1)
    assert len(gets_of(hub, "/cdn/datasets/" + name)) == 2


@pytest.mark.parametrize("name", [f"{SHARD_DIR}/fineweb_train_000000.bin",  # sha256 from X-Linked-Etag
                                  "tokenizers/fineweb_1024_bpe.vocab"])   # sha256 from the manifest
def test_persistent_corruption_fails_naming_the_file(hub, tmp_path, name):
    hub.corrupt[f"datasets/{name}"] = "always"
    local = tmp_path / "data"
    result = download(hub, local, "--train-shards", "1", "--retries", "1")
    assert result.returncode == 1
    assert f"error: {name}: sha256 mismatch" in result.stderr and "gave up after 2 attempts" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (local / name).exists() and not (local / (name + ".part")).exists()
    others = {p: d for p, d in expected_local(hub, 1).items() if p != name}
    assert local_files(local) == others  # everything else still arrived


def test_missing_token_and_wrong_repo_are_reported(hub, tmp_path):
    result = download(hub, tmp_path / "a", token=None)
    assert result.returncode == 1
    assert "manifest.json: HTTP 401" in result.stderr and "HF_TOKEN" in result.stderr
    result = download(hub, tmp_path / "b", "--repo-id", "golfer/nope")
    assert result.returncode == 1 and "manifest.json: HTTP 404" in result.stderr
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_bad_requests_are_usage_errors(hub, tmp_path):
    local = tmp_path / "data"
    result = download(hub, local, "--variant", "sp4096")
    assert result.returncode == 2 and "--variant sp4096" in result.stderr and "published: sp1024" in result.stderr
    result = download(hub, local, "--train-shards", "5")
    assert result.returncode == 2 and "--train-shards 5: sp1024 has only 3 train shards" in result.stderr
    assert not (local / "datasets").exists()


def test_default_takes_all_shards_when_fewer_than_80(hub, tmp_path):
    local = tmp_path / "data"
    result = download(hub, local, "--jobs", "1")
    assert result.returncode == 0, result.stderr
    assert local_files(local) == expected_local(hub, 3)


def test_the_default_variant_is_the_training_default(tmp_path):
    """The downloader fetches by default the variant train_gpt.py reads by default: its shards' folder under data/
    is DATA_PATH's default, its tokenizer TOKENIZER_PATH's, its vocabulary VOCAB_SIZE's."""
    from train_gpt import build_config

    result = subprocess.run([sys.executable, str(DOWNLOAD), "--help"], capture_output=True, text=True, timeout=60)
    default = re.search(r"\(default sp(\d+)", " ".join(result.stdout.split()))
    assert result.returncode == 0 and default, result.stdout[-2000:]
    cfg, vocab = build_config({}), int(default[1])
    assert (cfg.data_path, cfg.tokenizer_path, cfg.vocab_size) == (
        f"./data/datasets/fineweb10B_sp{vocab}", f"./data/tokenizers/fineweb_{vocab}_bpe.model", vocab)


@pytest.mark.parametrize("variant, repo", [("sp8192", "kevclark/parameter-golf"),
                                           ("sp1024", "willdepueoai/parameter-golf")])
def test_default_repo_is_one_that_publishes_the_variant(hub, tmp_path, variant, repo):
    """sp8192 is not in the challenge's own repo; the records fetch it from kevclark/parameter-golf."""
    result = download(hub, tmp_path / "data", "--variant", variant, repo_id=None)
    assert result.returncode == 1 and "manifest.json: HTTP 404" in result.stderr  # the fake hub serves neither
    asked = [r["path"] for r in hub.log if "/resolve/" in r["path"]]
    assert asked == [f"/datasets/{repo}/resolve/main/datasets/manifest.json"]


def test_unreachable_host_fails_fast_naming_it_and_the_offline_way(hub, tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = download(hub, tmp_path / "data", endpoint=f"http://127.0.0.1:{port}", timeout=30)
    assert time.monotonic() - start < 15  # the 5 retries with doubling waits took over a minute
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"cannot reach 127.0.0.1:{port}" in errors[0], result.stderr
    assert "data/build_shards.py" in errors[0]
    assert result.stderr.count("retrying") == 2


@pytest.mark.parametrize("args, endpoint, line", [
    (("--timeout", "nan"), "http://127.0.0.1:9", "--timeout nan: must be a finite number"),  # settimeout: ValueError
    (("--timeout", "inf"), "http://127.0.0.1:9", "--timeout inf: must be a finite number"),  # OverflowError
    (("--retry-wait", "nan"), "http://127.0.0.1:9", "--retry-wait nan: must be a finite number"),  # time.sleep(nan)
    ((), "", "HF_ENDPOINT='': expected an http(s)://host URL"),  # urllib: ValueError unknown url type
    ((), "hub.example.org", "HF_ENDPOINT='hub.example.org': expected an http(s)://host URL"),
])
def test_values_that_would_raise_mid_request_are_usage_errors(tmp_path, args, endpoint, line):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MATCHED_FINEWEB_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"))
    command = [sys.executable, str(DOWNLOAD), "--local-dir", str(tmp_path / "data"), "--retries", "1", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == f"cached_challenge_fineweb.py: error: {line}\n", result.stderr
    assert not (tmp_path / "data").exists()
