#!/usr/bin/env python3
"""Download the published challenge data: FineWeb token shards and their tokenizer.

    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80

fills `data/datasets/fineweb10B_sp1024/` (the full val split and the first N train shards)
and `data/tokenizers/` (the matching SentencePiece model), keeping the dataset repo's
`manifest.json` as `data/manifest.json`. The manifest decides what exists: which variants,
how many train/val shards, which tokenizer files. Where it comes from:

    MATCHED_FINEWEB_REPO_ID             dataset repo (default kevclark/parameter-golf for sp8192,
                                        which publishes it, else willdepueoai/parameter-golf)
    MATCHED_FINEWEB_REMOTE_ROOT_PREFIX  folder inside it (default datasets)
    HF_ENDPOINT, HF_TOKEN               honoured as by huggingface_hub (mirror, private repos)

How each file is fetched, and why not with `hf_hub_download`: that function copies into
the shared Hugging Face cache and then we would link or copy out of it, it gives no hook to
check a shard's own header, and its resume and retry behaviour is not something this tool
can bound or report on. So huggingface_hub is used for what it owns (the endpoint, the
token, the `resolve` URL of a file) and the transfer is plain HTTP here:

  * A file is downloaded to `NAME.part` and renamed to `NAME` only after it checks out, so
    a file under its final name is always complete. A later run resumes a `.part` with an
    HTTP Range request; a file already present under its final name is skipped without
    any network access (the manifest too, unless --refresh-manifest).
  * Checks: the byte count the server announced (Content-Length / Content-Range, and the
    X-Linked-Size that the Hub sends for large files); the SHA-256, when the manifest
    lists one for the file (entries of an optional "files" list: {"path", "bytes",
    "sha256"}) or the Hub's X-Linked-Etag carries one (it does for LFS/Xet files); and for
    shards the header (magic 20240520, version 1) and size = 1024 + 2 * token count.
  * Every request has a timeout (--timeout); dropped connections, timeouts, 5xx/429 and
    failed checks are retried (--retries, growing waits), resuming where possible.
    404/401/403 fail at once, and so does a host that cannot be reached at all (name
    resolution or connection refused: two quick retries, then one line naming the host and the
    offline alternative, data/build_shards.py). Every failure names the file and the reason.
  * Redirects are followed by hand so the token is never sent to another host (the Hub
    redirects large files to a CDN with a signed URL).

Exit status: 0 done, 1 a download failed, 2 bad arguments or manifest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import hashlib
import http.client
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"  # the challenge's own: sp1024 (and sp4096)
VARIANT_REPO_IDS = {"sp8192": "kevclark/parameter-golf"}  # where the records fetch the variants it lacks
UNREACHABLE_RETRIES = 2  # a host that does not resolve or refuses connections: quick retries only
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens, what the baseline trains on
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_BYTES = 1024
CHUNK = 1 << 20
PROG = "cached_challenge_fineweb.py"


class UsageError(Exception):
    """Bad arguments or an unusable manifest: exit 2."""


class DownloadError(Exception):
    """A file could not be fetched or failed its checks for good: exit 1."""


class RetryableError(Exception):
    """Worth another attempt: dropped connection, timeout, server error, failed check."""


class UnreachableError(RetryableError):
    """The host did not resolve or refused the connection: offline, or a wrong HF_ENDPOINT."""

    def __init__(self, host: str, reason):
        super().__init__(f"cannot reach {host} ({reason})")
        self.host = host


class OfflineError(DownloadError):
    """UnreachableError that persisted: stop everything, one line for the whole run."""


# ---------------------------------------------------------------------------------------
# What to fetch: the manifest names datasets (shard counts per split) and tokenizers.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the remote root, e.g. datasets/fineweb10B_sp1024/fineweb_val_000000.bin
    local: Path
    size: int | None = None  # from the manifest, when it says
    sha256: str | None = None

    @property
    def is_shard(self) -> bool:
        return self.path.endswith(".bin")


def safe_relative(path: str, what: str) -> str:
    """Manifest paths become local paths: refuse anything that could escape the data folder."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\\" in path:
        raise UsageError(f"manifest.json: {what} path {path!r} is not a plain relative path")
    return "/".join(parts)


def file_checks(manifest: dict) -> dict[str, dict]:
    """Optional per-file sizes/hashes: {"files": [{"path": ..., "bytes": ..., "sha256": ...}]}."""
    entries = manifest.get("files") or []
    if isinstance(entries, dict):
        entries = [{"path": k, **v} for k, v in entries.items()]
    return {str(e["path"]).strip("/"): e for e in entries if isinstance(e, dict) and "path" in e}


def find_entry(manifest: dict, key: str, name: str) -> dict | None:
    return next((e for e in manifest.get(key) or [] if isinstance(e, dict) and e.get("name") == name), None)


def plan_files(manifest: dict, variant: str, train_shards: int | None, local_dir: Path) -> list[RemoteFile]:
    """The files of one variant, val first, then train shards, then tokenizer files.

    train_shards None means the default: 80, or all of them when fewer are published.
    """
    dataset_name = f"fineweb10B_{variant}"
    dataset = find_entry(manifest, "datasets", dataset_name)
    if dataset is None:
        names = sorted(str(e.get("name")) for e in manifest.get("datasets") or [] if isinstance(e, dict))
        published = ", ".join(n.removeprefix("fineweb10B_") for n in names) or "none"
        raise UsageError(f"--variant {variant}: no dataset {dataset_name} in manifest.json (published: {published})")
    stats = dataset.get("stats") or {}
    try:
        available, val_shards = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"manifest.json: dataset {dataset_name} has no stats.files_train/files_val counts") from None
    if train_shards is None:
        train_shards = min(DEFAULT_TRAIN_SHARDS, available)
    if train_shards > available:
        raise UsageError(f"--train-shards {train_shards}: {variant} has only {available} train shards")
    tokenizer = find_entry(manifest, "tokenizers", dataset.get("tokenizer_name"))
    if tokenizer is None:
        raise UsageError(f"manifest.json: tokenizer {dataset.get('tokenizer_name')!r} of {dataset_name} is not listed")
    folder = safe_relative(str(dataset.get("path") or f"datasets/{dataset_name}"), "dataset")
    paths = [f"{folder}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    paths += [f"{folder}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    artifacts = [tokenizer[key] for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    paths += [safe_relative(str(path), "tokenizer") for path in artifacts]
    checks = file_checks(manifest)
    return [
        RemoteFile(p, local_dir / p, checks.get(p, {}).get("bytes"), checks.get(p, {}).get("sha256"))
        for p in paths
    ]


# ---------------------------------------------------------------------------------------
# HTTP: one GET with a timeout, redirects followed by hand (the token stays on its host).
# ---------------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError for the 3xx, which http_get follows itself


_OPENER = urllib.request.build_opener(_NoRedirects)
REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


def http_get(url: str, headers: dict[str, str], timeout: float, name: str):
    """Return (response, hub_headers): hub_headers are the X-Linked-* of the first hop."""
    hub: dict[str, str] = {}
    host = urllib.parse.urlsplit(url).netloc
    for _ in range(10):
        request = urllib.request.Request(url, headers=headers)
        try:
            response = _OPENER.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            for key in ("X-Linked-Size", "X-Linked-Etag"):
                if exc.headers.get(key) and key not in hub:
                    hub[key] = exc.headers[key]
            if exc.code in REDIRECTS and exc.headers.get("Location"):
                url = urllib.parse.urljoin(url, exc.headers["Location"])
                if urllib.parse.urlsplit(url).netloc != host:
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                exc.close()
                continue
            if exc.code == 416:
                raise
            raise http_failure(exc, name) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc) or type(exc).__name__
            if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or getattr(reason, "errno", None) in (
                    errno.ENETUNREACH, errno.EHOSTUNREACH):
                raise UnreachableError(urllib.parse.urlsplit(url).netloc, reason) from None
            raise RetryableError(f"cannot connect: {reason}") from None
        for key in ("X-Linked-Size", "X-Linked-Etag"):
            if response.headers.get(key) and key not in hub:
                hub[key] = response.headers[key]
        return response, hub
    raise DownloadError(f"{name}: too many redirects")


def http_failure(exc: urllib.error.HTTPError, name: str) -> Exception:
    if exc.code in RETRY_STATUSES:
        return RetryableError(f"server answered HTTP {exc.code} {exc.reason}")
    hint = {
        401: " (set HF_TOKEN if the repo is private or gated)",
        403: " (this token may not read the repo)",
        404: " (check --variant, MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)",
    }.get(exc.code, "")
    return DownloadError(f"{name}: HTTP {exc.code} {exc.reason}{hint}")


def expected_total(response, offset: int) -> tuple[int, int]:
    """(where this response starts, full file size) from a 200 or 206 response."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", "").strip())
        if not match:
            raise RetryableError(f"bad Content-Range {response.headers.get('Content-Range')!r}")
        start, total = int(match.group(1)), int(match.group(3))
        if start != offset:
            raise RetryableError(f"asked for bytes from {offset}, got a range from {start}")
        return start, total
    length = response.headers.get("Content-Length")
    if length is None or not length.isdigit():
        raise RetryableError("server sent no Content-Length")
    return 0, int(length)


def hub_sha256(hub: dict[str, str]) -> str | None:
    etag = hub.get("X-Linked-Etag", "").removeprefix("W/").strip('"').lower()
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


# ---------------------------------------------------------------------------------------
# One file: resume or start a .part, stream it, check it, rename it.
# ---------------------------------------------------------------------------------------


class Progress:
    """Thread-safe running totals, one status line on stderr every few seconds."""

    def __init__(self, total_files: int, every_s: float = 5.0):
        self.lock = threading.Lock()
        self.total_files, self.every_s = total_files, every_s
        self.done = self.skipped = 0
        self.received = 0
        self.start = self.last = time.monotonic()

    def say(self, line: str) -> None:
        with self.lock:
            print(line, file=sys.stderr, flush=True)

    def add_bytes(self, n: int, name: str, have: int, total: int) -> None:
        with self.lock:
            self.received += n
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                rate = self.received / max(now - self.start, 1e-9) / 1e6
                print(f"  {self.done + self.skipped}/{self.total_files} files done, {self.received / 1e6:,.1f} MB "
                      f"received, {rate:.1f} MB/s; {name} {have / 1e6:,.1f}/{total / 1e6:,.1f} MB",
                      file=sys.stderr, flush=True)


def shard_problem(path: Path, size: int) -> str | None:
    """Why a downloaded shard is not a valid shard file, or None."""
    with open(path, "rb") as f:
        header = f.read(12)
    if len(header) < 12:
        return f"only {size} bytes, shorter than a shard header"
    magic, version, count = (int.from_bytes(header[i : i + 4], "little", signed=True) for i in (0, 4, 8))
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        return f"bad shard header (magic {magic}, version {version})"
    if size != HEADER_BYTES + 2 * count:
        return f"header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the file has {size} bytes"
    return None


def already_complete(item: RemoteFile) -> str | None:
    """None when the final file is there and plausible, else why it must be fetched."""
    if not item.local.is_file():
        return "missing"
    size = item.local.stat().st_size
    if item.size is not None and size != int(item.size):
        return f"has {size} bytes, manifest says {item.size}"
    return shard_problem(item.local, size) if item.is_shard else None


@dataclass
class Fetcher:
    repo_id: str
    remote_root: str
    revision: str
    timeout: float
    retries: int
    retry_wait: float
    progress: Progress

    def url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        full = f"{self.remote_root}/{path}" if self.remote_root else path
        return hf_hub_url(self.repo_id, full, repo_type="dataset", revision=self.revision)

    def headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(library_name="parameter-golf-data")
        headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file
        return headers

    def fetch(self, item: RemoteFile) -> bool:
        """Make item.local complete; return False when it already was."""
        why = already_complete(item)
        if why is None:
            with self.progress.lock:
                self.progress.skipped += 1
            return False
        if why != "missing":
            self.progress.say(f"  {item.path}: existing file {why}; downloading it again")
        item.local.parent.mkdir(parents=True, exist_ok=True)
        part = item.local.with_name(item.local.name + ".part")
        for attempt in range(self.retries + 1):
            try:
                self.transfer(item, part)
                os.replace(part, item.local)
                break
            except UnreachableError as exc:
                if attempt >= min(self.retries, UNREACHABLE_RETRIES):
                    raise OfflineError(f"{item.path}: {exc}; no network (or a wrong HF_ENDPOINT)? Without one, "
                                       "build shards from local text with data/build_shards.py (see data/README.md)"
                                       ) from None
                wait = min(self.retry_wait, 1.0)
                self.progress.say(f"  {item.path}: {exc}; retrying in {wait:.0f}s "
                                  f"({attempt + 1}/{UNREACHABLE_RETRIES})")
                time.sleep(wait)
            except RetryableError as exc:
                if attempt == self.retries:
                    raise DownloadError(f"{item.path}: {exc} (gave up after {attempt + 1} attempts)") from None
                wait = min(self.retry_wait * 2**attempt, 60.0)
                self.progress.say(f"  {item.path}: {exc}; retrying in {wait:.0f}s ({attempt + 1}/{self.retries})")
                time.sleep(wait)
        with self.progress.lock:
            self.progress.done += 1
        self.progress.say(f"  ok {item.path} ({item.local.stat().st_size:,} bytes)")
        return True

    def transfer(self, item: RemoteFile, part: Path) -> None:
        """One attempt: continue part from where it ends, then check the whole file."""
        offset = part.stat().st_size if part.exists() else 0
        digest = hashlib.sha256()
        headers = self.headers()
        if offset:
            hash_prefix(part, digest)
            headers["Range"] = f"bytes={offset}-"
        try:
            response, hub = http_get(self.url(item.path), headers, self.timeout, item.path)
        except urllib.error.HTTPError as exc:  # 416: the range starts at or past the end
            exc.close()
            part.unlink(missing_ok=True)
            raise RetryableError("server refused to resume the partial file; starting over") from None
        with response:
            start, total = expected_total(response, offset)
            if start == 0 and offset:
                digest = hashlib.sha256()  # the server sent the whole file, not the rest
            for source, size in (("the manifest", item.size), ("X-Linked-Size", hub.get("X-Linked-Size"))):
                if size is not None and int(size) != total:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{item.path}: server sends {total:,} bytes, {source} says {int(size):,}")
            have = self.stream(response, part, start, total, digest, item.path)
        if have != total:
            raise RetryableError(f"connection closed after {have:,} of {total:,} bytes")
        self.check(item, part, total, digest.hexdigest(), item.sha256 or hub_sha256(hub))

    def stream(self, response, part: Path, start: int, total: int, digest, name: str) -> int:
        have = start
        with open(part, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets
                    out.flush()
                    reason = str(exc) or type(exc).__name__
                    raise RetryableError(f"connection lost after {have:,} of {total:,} bytes: {reason}") from None
                if not chunk:
                    return have
                out.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                self.progress.add_bytes(len(chunk), name, have, total)

    def check(self, item: RemoteFile, part: Path, size: int, sha256: str, expected: str | None) -> None:
        if expected and sha256 != expected.lower():
            part.unlink()
            raise RetryableError(f"sha256 mismatch: got {sha256}, expected {expected.lower()}")
        problem = shard_problem(part, size) if item.is_shard else None
        if problem:
            part.unlink()
            raise RetryableError(f"not a valid shard: {problem}")


def hash_prefix(path: Path, digest) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Download challenge FineWeb shards and their tokenizer from a Hugging Face dataset repo.",
        epilog="Environment: MATCHED_FINEWEB_REPO_ID, MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, HF_ENDPOINT, HF_TOKEN.",
    )
    p.add_argument("train_shards_positional", nargs="?", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="sp8192", help="tokenizer family: sp1024, sp4096, sp8192, ... (default sp8192, as train_gpt.py)")
    p.add_argument("--train-shards", type=int, default=None,
                   help=f"how many train shards (100M tokens each) to fetch, from the first "
                        f"(default {DEFAULT_TRAIN_SHARDS}, or all when fewer are published)")
    p.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
                   help=f"dataset repo (default: $MATCHED_FINEWEB_REPO_ID, else {VARIANT_REPO_IDS['sp8192']} for "
                        f"sp8192, which publishes it, and {DEFAULT_REPO_ID} for the others)")
    p.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT),
                   help="folder of the export inside the repo; '' for the repo root "
                        "(default: $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or %(default)s)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the repo (default main)")
    p.add_argument("--local-dir", default=str(Path(__file__).resolve().parent), metavar="DIR",
                   help="where datasets/, tokenizers/ and manifest.json go (default: this script's folder)")
    p.add_argument("--jobs", type=int, default=4, help="files downloaded at once (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on connect or read (default 60)")
    p.add_argument("--retries", type=int, default=5, help="retries per file after a failure (default 5)")
    p.add_argument("--retry-wait", type=float, default=2.0, help="first wait between retries, doubling (default 2s)")
    manifest = p.add_mutually_exclusive_group()
    manifest.add_argument("--refresh-manifest", action="store_true", help="download manifest.json even if present")
    manifest.add_argument("--skip-manifest", action="store_true",
                          help="never download manifest.json; use the local one")
    return p


def check_args(args) -> None:
    args.repo_id = args.repo_id or VARIANT_REPO_IDS.get(args.variant, DEFAULT_REPO_ID)
    if args.train_shards_positional is not None:
        args.train_shards = args.train_shards_positional
    for flag, value, low in (("--train-shards", args.train_shards or 0, 0), ("--jobs", args.jobs, 1),
                             ("--retries", args.retries, 0), ("--timeout", args.timeout, 0.001),
                             ("--retry-wait", args.retry_wait, 0)):
        if not math.isfinite(value):  # nan or inf: the socket's timeout and time.sleep raise on them
            raise UsageError(f"{flag} {value}: must be a finite number")
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    try:
        import huggingface_hub  # noqa: F401  (endpoint, token and URLs come from it)
    except ImportError:
        raise UsageError("huggingface_hub is not installed: pip install huggingface_hub") from None
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.variant):
        raise UsageError(f"--variant {args.variant!r}: expected a name like sp1024")
    from huggingface_hub import hf_hub_url

    url = urllib.parse.urlsplit(hf_hub_url(args.repo_id, "manifest.json", repo_type="dataset"))
    if url.scheme not in ("http", "https") or not url.netloc:  # urllib would raise on it ("unknown url type")
        raise UsageError(f"HF_ENDPOINT={os.environ.get('HF_ENDPOINT', '')!r}: expected an http(s)://host URL")
    args.remote_root = args.remote_root.strip().strip("/")
    if args.remote_root:
        safe_relative(args.remote_root, "remote root")


def load_manifest(args, fetcher: Fetcher, local_dir: Path) -> dict:
    """The local manifest.json, fetched when missing, stale for this request, or asked for."""
    item = RemoteFile("manifest.json", local_dir / "manifest.json")
    if args.refresh_manifest and item.local.exists():
        item.local.unlink()
    if not item.local.exists() and args.skip_manifest:
        raise UsageError(f"--skip-manifest: {item.local} does not exist")
    fetcher.fetch(item)
    manifest = read_manifest(item.local)
    if args.skip_manifest or args.refresh_manifest:
        return manifest
    try:
        plan_files(manifest, args.variant, args.train_shards, local_dir)
        return manifest
    except UsageError:  # maybe the repo grew, or this manifest is from another repo: ask once
        fetcher.progress.say("local manifest.json does not cover this request; fetching it again")
        item.local.unlink()
        fetcher.fetch(item)
        return read_manifest(item.local)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc}); delete it or use --refresh-manifest") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: expected a JSON object with 'datasets' and 'tokenizers'")
    return manifest


def run(args) -> int:
    local_dir = Path(args.local_dir)
    progress = Progress(0)
    fetcher = Fetcher(args.repo_id, args.remote_root, args.revision,
                      args.timeout, args.retries, args.retry_wait, progress)
    where = f"{args.repo_id}/{args.remote_root}" if args.remote_root else args.repo_id
    progress.say(f"{where} ({args.revision}) -> {local_dir}")
    manifest = load_manifest(args, fetcher, local_dir)
    files = plan_files(manifest, args.variant, args.train_shards, local_dir)
    progress.total_files, progress.done, progress.skipped = len(files), 0, 0
    shards = sum("fineweb_train_" in item.path for item in files)
    progress.say(f"{args.variant}: {len(files)} files (val split, {shards} train shards, tokenizer)")
    failures = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(fetcher.fetch, item): item for item in files}
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except OfflineError as exc:  # every other file would fail the same way: one line says it
                failures = [str(exc)]
                for other in futures:
                    other.cancel()
                break
            except DownloadError as exc:
                failures.append(str(exc))
                progress.say(f"  FAILED {exc}")
            except OSError as exc:
                failures.append(f"{futures[future].path}: {exc.strerror or exc} ({exc.filename or 'local file'})")
                progress.say(f"  FAILED {failures[-1]}")
    elapsed = time.monotonic() - progress.start
    print(f"{progress.done} downloaded, {progress.skipped} already complete, {len(failures)} failed; "
          f"{progress.received / 1e6:,.1f} MB in {elapsed:.1f}s")
    for line in failures:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except (UsageError, DownloadError) as exc:  # a manifest or HTTP failure before any shard
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; partial files are kept as *.part and resume next time", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
