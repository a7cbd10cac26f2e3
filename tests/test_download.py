"""Tests of checkpoint downloads against a real HTTP server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from bigtransfer.checkpoints.download import DownloadError, cache_dir, download
from http_server import serve_directory

SRC = Path(__file__).resolve().parents[1] / "src"


def _make_file(root: Path, name: str = "model.bin", size: int = 1 << 20) -> tuple[bytes, str]:
    """Random content (so a wrong offset is never silently equal) and its sha256."""
    data = os.urandom(size)
    (root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def _validators(url: str) -> tuple[str | None, str | None]:
    """The (ETag, Last-Modified) the server sends for ``url`` now, from a HEAD request."""
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as response:
        return response.headers.get("ETag"), response.headers.get("Last-Modified")


def _interrupted_download(url: str, dest: Path, after: int) -> None:
    """Leave ``dest``'s part file as an earlier run does when its connection drops for good after ``after``
    bytes (the caller's server drops its first GET there)."""
    with pytest.raises(DownloadError, match="resumes"):
        download(url, dest, progress=False, retries=0)
    assert Path(str(dest) + ".part").stat().st_size == after


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    return root


def test_plain_download_then_cache_hit(served: Path, tmp_path: Path) -> None:
    data, digest = _make_file(served)
    dest = tmp_path / "cache" / "sub" / "model.bin"
    with serve_directory(served) as server:
        assert download(server.url + "model.bin", dest, digest, progress=True) == dest
        assert dest.read_bytes() == data
        assert not Path(str(dest) + ".part").exists()
        assert len(server.requests) == 1 and server.requests[0].range is None

        assert download(server.url + "model.bin", str(dest), digest) == dest
        assert len(server.requests) == 1  # cache hit: no network


def test_resume_after_dropped_connections(served: Path, tmp_path: Path) -> None:
    data, digest = _make_file(served)
    dest = tmp_path / "model.bin"
    with serve_directory(served, drop_after=300_000, drops=2) as server:
        download(server.url + "model.bin", dest, digest, progress=False)
        etag, _ = _validators(server.url + "model.bin")
    assert dest.read_bytes() == data
    assert server.bytes_sent == len(data)
    assert [r.dropped for r in server.requests[:3]] == [True, True, False]
    assert [r.range for r in server.requests[:3]] == [None, "bytes=300000-", "bytes=600000-"]
    assert etag and [r.if_range for r in server.requests[:3]] == [None, etag, etag]
    assert not Path(str(dest) + ".part.json").exists()


def test_resume_with_last_modified_when_there_is_no_etag(served: Path, tmp_path: Path) -> None:
    data, digest = _make_file(served)
    dest = tmp_path / "model.bin"
    with serve_directory(served, drop_after=300_000, drops=1, etag=False) as server:
        download(server.url + "model.bin", dest, digest, progress=False)
        _, last_modified = _validators(server.url + "model.bin")
    assert dest.read_bytes() == data
    assert [(r.range, r.if_range, r.status) for r in server.requests[:2]] == [
        (None, None, 200),
        ("bytes=300000-", last_modified, 206),
    ]


def test_no_resume_without_a_validator(served: Path, tmp_path: Path) -> None:
    """A server that sends neither ETag nor Last-Modified gives no way to tell that the rest of the file
    belongs to the same version as the part: each retry starts over."""
    data, digest = _make_file(served)
    dest = tmp_path / "model.bin"
    with serve_directory(served, drop_after=300_000, drops=2, etag=False, last_modified=False) as server:
        download(server.url + "model.bin", dest, digest, progress=False)
    assert dest.read_bytes() == data
    assert [(r.range, r.status) for r in server.requests] == [(None, 200)] * 3


def test_resume_leftover_part_from_earlier_run(served: Path, tmp_path: Path) -> None:
    data, digest = _make_file(served)
    dest = tmp_path / "model.bin"
    half = len(data) // 2
    with serve_directory(served, drop_after=half, drops=1) as server:
        _interrupted_download(server.url + "model.bin", dest, half)
    with serve_directory(served) as server:
        download(server.url + "model.bin", dest, digest, progress=False)
        etag, _ = _validators(server.url + "model.bin")
    assert dest.read_bytes() == data
    assert len(server.requests) == 2  # the resume, then our HEAD
    assert (server.requests[0].range, server.requests[0].if_range) == (f"bytes={half}-", etag)
    assert server.requests[0].status == 206
    assert server.bytes_sent == len(data) - half


def test_stale_part_of_a_file_changed_on_the_server_is_discarded(served: Path, tmp_path: Path) -> None:
    """The file was replaced (same name, same size) since the part was written, and no digest is known,
    as for the registry's checkpoints: the part must not be spliced with the new file's tail."""
    _make_file(served)
    dest = tmp_path / "model.bin"
    half = 1 << 19
    with serve_directory(served, drop_after=half, drops=1) as server:
        _interrupted_download(server.url + "model.bin", dest, half)
    new_data, new_digest = _make_file(served)
    with serve_directory(served) as server:
        download(server.url + "model.bin", dest, progress=False)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == new_digest
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={half}-", 200)]
    assert server.requests[0].if_range is not None
    assert server.bytes_sent == len(new_data)
    assert not Path(str(dest) + ".part").exists() and not Path(str(dest) + ".part.json").exists()


def test_resumed_range_of_another_size_restarts(served: Path, tmp_path: Path) -> None:
    """Last-Modified has one-second resolution, so a file rewritten within that second still matches
    If-Range; the total in Content-Range then differs from the size recorded with the part."""
    _make_file(served)
    dest = tmp_path / "model.bin"
    mtime = (served / "model.bin").stat().st_mtime
    with serve_directory(served, drop_after=300_000, drops=1, etag=False) as server:
        _interrupted_download(server.url + "model.bin", dest, 300_000)
    new_data, new_digest = _make_file(served, size=(1 << 20) + 1000)
    os.utime(served / "model.bin", (mtime, mtime))
    with serve_directory(served, etag=False) as server:
        download(server.url + "model.bin", dest, progress=False)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == new_digest
    assert [(r.range, r.status) for r in server.requests] == [("bytes=300000-", 206), (None, 200)]


def test_a_range_sent_from_another_offset_restarts(served: Path, tmp_path: Path) -> None:
    """A server (or a proxy) that answers 206 for bytes other than the ones asked for: appending them would
    splice the file; the client starts over instead."""
    _, digest = _make_file(served)
    dest = tmp_path / "model.bin"
    with serve_directory(served, drop_after=300_000, drops=1) as server:
        _interrupted_download(server.url + "model.bin", dest, 300_000)
    with serve_directory(served, range_shift=-4096) as server:
        download(server.url + "model.bin", dest, progress=False)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    assert [(r.range, r.status) for r in server.requests] == [("bytes=300000-", 206), (None, 200)]


def test_part_without_a_record_is_not_resumed(
    served: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A part left by an older version carries no validator: nothing says it is of the file served now."""
    data, _ = _make_file(served)
    dest = tmp_path / "model.bin"
    Path(str(dest) + ".part").write_bytes(os.urandom(len(data) // 2))
    caplog.set_level(logging.INFO, logger="bigtransfer")
    with serve_directory(served) as server:
        download(server.url + "model.bin", dest, progress=False)
    assert dest.read_bytes() == data
    assert [(r.range, r.status) for r in server.requests] == [(None, 200)]
    assert "discarding" in caplog.text and ".part" in caplog.text


def test_leftover_part_as_big_as_file_restarts(served: Path, tmp_path: Path) -> None:
    data, digest = _make_file(served, size=100_000)
    dest = tmp_path / "model.bin"
    with serve_directory(served, drop_after=50_000, drops=1) as server:
        _interrupted_download(server.url + "model.bin", dest, 50_000)
    with open(str(dest) + ".part", "ab") as fh:
        fh.write(b"x" * 100_000)  # the part grew past the file: 416
    with serve_directory(served) as server:
        download(server.url + "model.bin", dest, digest, progress=False)
    assert dest.read_bytes() == data
    assert [r.status for r in server.requests] == [416, 200]


def test_checksum_mismatch(served: Path, tmp_path: Path) -> None:
    _, digest = _make_file(served, size=100_000)
    dest = tmp_path / "model.bin"
    wrong = "0" * 64
    with serve_directory(served) as server, pytest.raises(DownloadError) as excinfo:
        download(server.url + "model.bin", dest, wrong, progress=False)
    message = str(excinfo.value)
    assert wrong in message and digest in message and "deleted" in message
    assert not dest.exists()
    assert not Path(str(dest) + ".part").exists()


def test_404_names_url(served: Path, tmp_path: Path) -> None:
    dest = tmp_path / "missing.bin"
    with serve_directory(served) as server:
        url = server.url + "missing.bin"
        with pytest.raises(DownloadError, match="404") as excinfo:
            download(url, dest, progress=False)
    assert url in str(excinfo.value)
    assert len(server.requests) == 1  # no retries for a client error
    assert not dest.exists()


def test_retries_exhausted_keeps_part(served: Path, tmp_path: Path) -> None:
    _make_file(served)
    dest = tmp_path / "model.bin"
    with serve_directory(served, drop_after=100_000, drops=10) as server:
        url = server.url + "model.bin"
        with pytest.raises(DownloadError) as excinfo:
            download(url, dest, progress=False, retries=2)
    message = str(excinfo.value)
    assert url in message and "300000 bytes" in message and "resumes" in message
    assert len(server.requests) == 3  # the first try and two retries
    part = Path(str(dest) + ".part")
    assert part.stat().st_size == 300_000
    assert not dest.exists()


def test_failure_with_nothing_received_claims_no_part(served: Path, tmp_path: Path) -> None:
    with serve_directory(served) as server:
        url = server.url + "model.bin"
    dest = tmp_path / "model.bin"  # the server is gone: every connection is refused
    with pytest.raises(DownloadError) as excinfo:
        download(url, dest, progress=False, retries=1)
    message = str(excinfo.value)
    assert url in message and "0 bytes received" in message
    assert ".part" not in message and "resumes" not in message
    assert not Path(str(dest) + ".part").exists()


def test_concurrent_processes_download_once(served: Path, tmp_path: Path) -> None:
    data, digest = _make_file(served)
    dest = tmp_path / "cache" / "model.bin"
    pythonpath = [str(SRC), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    # 16 chunks of 64 KiB at 50 ms each: the first download takes ~0.8 s, so the others wait on the lock.
    with serve_directory(served, delay_per_chunk=0.05) as server:
        code = textwrap.dedent(
            f"""
            from bigtransfer.checkpoints.download import download
            download({server.url + "model.bin"!r}, {str(dest)!r}, {digest!r}, progress=False)
            """
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        results = [(p.wait(timeout=60), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert dest.read_bytes() == data
    assert server.bytes_sent == len(data)
    assert len(server.requests) == 1


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BIT_HOME", str(tmp_path / "bit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "bit"
    monkeypatch.delenv("BIT_HOME")
    assert cache_dir() == tmp_path / "xdg" / "bigtransfer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "bigtransfer"
    assert not (tmp_path / "bit").exists()  # not created
