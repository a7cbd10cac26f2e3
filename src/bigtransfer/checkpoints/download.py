"""Download checkpoints into a local cache: locked, resumable, atomic and verified.

Checkpoints are hundreds of megabytes and are often fetched by several processes at once (one per DDP
rank), over connections that drop. So a download

* holds an exclusive file lock for ``dest`` so that only one process fetches it and the others find it
  cached when they get the lock (``dest + ".lock"`` stays afterwards: an flock lives on the file's inode,
  and removing the file would let a waiter and a newcomer lock two different files);
* streams into ``dest + ".part"`` and resumes from it with an HTTP ``Range`` request after a dropped
  connection or an interrupted earlier run. The file on the server may have changed in between, so the
  server's validator (a strong ETag, else Last-Modified) and the file's size are recorded in
  ``dest + ".part.json"`` when the part is started, the resume names that version in ``If-Range``, and
  anything but the continuation of that same version restarts from byte 0. A part with no record is
  never resumed;
* checks the finished size against the size the server announced and moves the file into place with
  :func:`os.replace`, so ``dest`` either does not exist or is complete (and, when a digest is given,
  verified).

Only :mod:`urllib.request` is used for HTTP(S), to avoid a dependency on ``requests``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import pathlib
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Protocol

from filelock import FileLock

__all__ = ["DownloadError", "cache_dir", "download"]

logger = logging.getLogger("bigtransfer")

CHUNK_SIZE = 1 << 20
"""Bytes read per chunk: large enough to be fast, small enough that a drop loses little."""

# What a dropped or stalled connection looks like: IncompleteRead is an HTTPException; connection resets,
# timeouts and socket errors are OSErrors; URLError wraps the ones raised while connecting.
_TRANSIENT_ERRORS = (http.client.HTTPException, urllib.error.URLError, OSError)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download failed in a way that retrying inside this call will not fix."""


class BadDownload(DownloadError):
    """The server answered with something other than the file wanted (size, digest, content); it was deleted."""


class _Dropped(Exception):
    """The connection ended before the whole body arrived; the bytes on disk are kept for a resume."""


class _Restart(Exception):
    """The server cannot continue the partial file; it has been removed, so start again from zero."""


@dataclasses.dataclass(frozen=True)
class _Version:
    """Which version of the file a part holds: the server's validator for it and the file's full size."""

    validator: str
    total: int | None


class _Progress(Protocol):
    def start(self, total: int | None, completed: int) -> None: ...
    def advance(self, n: int) -> None: ...


def cache_dir() -> pathlib.Path:
    """$BIT_HOME if set, else $XDG_CACHE_HOME/bigtransfer, else ~/.cache/bigtransfer. Not created here."""
    if bit_home := os.environ.get("BIT_HOME"):
        return pathlib.Path(bit_home).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(xdg).expanduser() / "bigtransfer"
    return pathlib.Path.home() / ".cache" / "bigtransfer"


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    *,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
    check: Callable[[pathlib.Path], object] | None = None,
) -> pathlib.Path:
    """Download ``url`` to ``dest`` unless it is already there, and return ``dest`` as a path.

    ``sha256`` (hex) is checked before the file is moved into place, so a cached ``dest`` is never a
    corrupt one. A dropped connection is retried up to ``retries`` times, resuming from the bytes already
    on disk; ``timeout`` is the socket timeout in seconds for each request. The progress bar goes to
    stderr. ``check`` reads the finished file and raises if it is not what was wanted (where no digest is known,
    an error page or a cut body would otherwise be cached as the file). Raises :class:`DownloadError` on HTTP
    errors, a digest mismatch, a failed check or when the retries run out.
    """
    dest = pathlib.Path(dest)
    if dest.exists() and _cache_matches(dest, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        # Another process (e.g. another DDP rank) may have finished while we waited for the lock.
        if dest.exists():
            if _cache_matches(dest, sha256, rehash=True):
                return dest
            logger.warning("cached %s does not have sha256 %s: downloading it again", dest, sha256)
            dest.unlink()
        part = pathlib.Path(str(dest) + ".part")
        logger.info("downloading %s -> %s", url, dest)
        with _progress_bar(progress, dest.name) as bar:
            total = _fetch_with_retries(url, part, bar, retries=retries, timeout=timeout)
        _check_size(url, part, total)
        if sha256 is not None:
            _verify(url, part, sha256)
        if check is not None:
            try:
                check(part)
            except Exception as e:
                _discard(part)
                raise BadDownload(f"{url} did not give the file wanted ({e}); the download was deleted") from e
        os.replace(part, dest)
        _version_file(part).unlink(missing_ok=True)
        if sha256 is not None:
            _sidecar(dest).write_text(sha256.lower())
    return dest


def _sidecar(dest: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(str(dest) + ".sha256")


def _cache_matches(dest: pathlib.Path, sha256: str | None, rehash: bool = False) -> bool:
    """Whether a cached file is the one wanted. The digest verified at download time is kept beside the
    file, so a cache hit costs no hashing; a file cached without it (or under another digest) is hashed
    once when `rehash` (inside the lock)."""
    if sha256 is None:
        return True
    sidecar = _sidecar(dest)
    if sidecar.exists() and sidecar.read_text().strip() == sha256.lower():
        return True
    if not rehash:
        return False
    if sha256_of(dest) != sha256.lower():
        return False
    sidecar.write_text(sha256.lower())
    return True


def _version_file(part: pathlib.Path) -> pathlib.Path:
    """Where the version a part holds is recorded, beside it."""
    return pathlib.Path(str(part) + ".json")


def _read_version(part: pathlib.Path) -> _Version | None:
    """The version recorded for ``part``; None when there is no readable record."""
    try:
        record = json.loads(_version_file(part).read_text())
        return _Version(str(record["validator"]), record["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_version(part: pathlib.Path, version: _Version | None) -> None:
    """Record (atomically) which version the freshly truncated ``part`` will hold; None removes the record,
    as a part whose version cannot be named must never be resumed."""
    path = _version_file(part)
    if version is None:
        path.unlink(missing_ok=True)
        return
    tmp = pathlib.Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(version)))
    os.replace(tmp, path)


def _discard(part: pathlib.Path) -> None:
    part.unlink(missing_ok=True)
    _version_file(part).unlink(missing_ok=True)


def _resumable(part: pathlib.Path) -> _Version | None:
    """The version a non-empty ``part`` holds, to resume it; a part without a record is discarded, since
    nothing says its bytes are of the file the server has now."""
    if not part.exists() or part.stat().st_size == 0:
        return None
    version = _read_version(part)
    if version is None:
        logger.info(
            "discarding %s: there is no record of which version of the file it holds (it was left by an older "
            "bigtransfer, or the server sends no ETag or Last-Modified)",
            part,
        )
        _discard(part)
    return version


def _validator(response: http.client.HTTPResponse) -> str | None:
    """What identifies this version of the file in ``If-Range``: the ETag, unless it is weak (not allowed
    there), else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _fetch_with_retries(
    url: str, part: pathlib.Path, bar: _Progress, *, retries: int, timeout: float
) -> int | None:
    """Fetch into ``part`` until it is complete, resuming after each drop, at most ``retries`` times;
    return the file's size when the server announced it."""
    attempt = 0
    restarted = False
    last_error = ""
    while True:
        try:
            return _fetch_once(url, part, bar, timeout=timeout)
        except _Restart:
            # Only one free restart: a server that keeps refusing the range is treated like a drop.
            if not restarted:
                restarted = True
                continue
        except _Dropped as exc:
            last_error = str(exc)
            logger.info("connection to %s dropped (%s)", url, exc)
        attempt += 1
        if attempt > retries:
            received = part.stat().st_size if part.exists() else 0
            if received and _read_version(part) is not None:
                kept = f"; the partial file {part} is kept and a re-run resumes from it"
            else:
                _discard(part)
                kept = ""
            raise DownloadError(
                f"download of {url} failed after {retries} retries with {received} bytes received (last error: "
                f"{last_error}){kept}"
            )
        time.sleep(0.2 * attempt)


def _fetch_once(url: str, part: pathlib.Path, bar: _Progress, *, timeout: float) -> int | None:
    """One HTTP request: append to (or restart) ``part`` and return the file's size when announced; raise
    :class:`_Dropped` if the body is short."""
    version = _resumable(part)
    offset = part.stat().st_size if version is not None else 0
    request = urllib.request.Request(url)
    if version is not None:
        logger.info("resuming at %d bytes", offset)
        request.add_header("Range", f"bytes={offset}-")
        # The server sends the range only if the file is still this version, else the whole file (200).
        request.add_header("If-Range", version.validator)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset > 0:
            # The part is already complete or bigger than the file: we cannot trust it, start over.
            _discard(part)
            raise _Restart from exc
        if 400 <= exc.code < 500:
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
        raise _Dropped(f"HTTP {exc.code} {exc.reason}") from exc
    except _TRANSIENT_ERRORS as exc:
        raise _Dropped(str(exc)) from exc

    with response:
        if response.status == 206:
            start, total = _content_range(response)
            if version is None or start != offset or total != version.total:
                # Not where the part ends, or not of the size the part's file has: start over.
                logger.info("%s sent bytes %s of %s, not the rest of the %s-byte part: starting over",
                            url, start, total, offset)
                _discard(part)
                raise _Restart
            mode = "ab"
        else:  # 200: the file changed since the part was written, or the server ignores Range.
            if version is not None:
                logger.info("%s sent the whole file instead of the rest (it changed, or the server does not "
                            "resume): starting over", url)
            offset, mode = 0, "wb"
            total = _content_length(response)
        bar.start(total, offset)
        received = offset
        with open(part, mode) as fh:
            if mode == "wb":  # recorded only now that open() truncated the old bytes, so no record outlives them
                validator = _validator(response)
                _write_version(part, None if validator is None else _Version(validator, total))
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except _TRANSIENT_ERRORS as exc:  # only network errors; a failing disk is not retried
                    raise _Dropped(f"{exc!r} after {received} bytes") from exc
                if not chunk:
                    break
                fh.write(chunk)
                received += len(chunk)
                bar.advance(len(chunk))
    if total is not None and received < total:
        raise _Dropped(f"body ended at {received} of {total} bytes")
    return total


def _content_range(response: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """(first byte, full file size) from a 206's Content-Range; None for what is missing or unknown."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        return None, None
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _content_length(response: http.client.HTTPResponse) -> int | None:
    length = response.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


def _check_size(url: str, part: pathlib.Path, total: int | None) -> None:
    """The finished part must have the size the server announced; one that does not is corrupt (e.g. a
    range that did not fit the file), so delete it rather than cache it."""
    size = part.stat().st_size
    if total is not None and size != total:
        _discard(part)
        raise BadDownload(
            f"download of {url} ended with {size} bytes but the server announced {total}; "
            f"the partial file {part} was deleted"
        )


def _verify(url: str, part: pathlib.Path, sha256: str) -> None:
    """Hash the finished part file; on mismatch delete it, since resuming it could never succeed."""
    actual = sha256_of(part)
    if actual != sha256.lower():
        _discard(part)
        raise BadDownload(
            f"sha256 mismatch for {url}: expected {sha256.lower()}, got {actual}; "
            f"the partial file {part} was deleted"
        )


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints and shards are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_SIZE):
            digest.update(block)
    return digest.hexdigest()


class _NoProgress:
    def start(self, total: int | None, completed: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


class _RichProgress:
    """A rich progress bar on stderr with bytes, speed and ETA; kept on screen after it finishes."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=None)

    def start(self, total: int | None, completed: int) -> None:
        self._progress.update(self._task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str) -> Iterator[_Progress]:
    if not enabled:
        yield _NoProgress()
        return
    with _RichProgress(description) as bar:
        yield bar
