"""A real HTTP file server on 127.0.0.1 for tests: Range requests, validators, slow responses and dropped
connections.

Tests of downloads should exercise real sockets rather than mocks, so that resuming, timeouts and
locking across processes are tested the way they fail in practice. Usage::

    with serve_directory(tmp_path, drop_after=300_000, drops=2) as server:
        download(server.url + "model.npz", dest)
        assert server.requests[1].range == "bytes=300000-"

Like nginx, S3 or GCS it sends an ``ETag`` and a ``Last-Modified`` for each file and honours ``If-Range``:
a range is served only while the validator the client names is still the file's, else the whole file is
sent with 200. The ETag is a digest of the content, so rewriting a file changes it even within one mtime
tick; ``etag=False`` or ``last_modified=False`` leaves a header out, to act as servers that lack it.

The server runs in a daemon thread of the test process and listens on a real port, so clients in
subprocesses can use it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import hashlib
import http.server
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FileServer", "RequestRecord", "serve_directory"]

SEND_CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclasses.dataclass
class RequestRecord:
    """One request as the server saw it; ``bytes_sent`` counts body bytes only."""

    method: str
    path: str
    range: str | None
    if_range: str | None = None
    status: int = 0
    bytes_sent: int = 0
    dropped: bool = False


class FileServer:
    """Serves files under ``root``; the first ``drops`` GETs are cut after ``drop_after`` body bytes."""

    def __init__(
        self,
        root: Path,
        *,
        drop_after: int | None = None,
        drops: int = 0,
        delay_per_chunk: float = 0.0,
        etag: bool = True,
        last_modified: bool = True,
        range_shift: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.range_shift = range_shift  # a broken server: its 206s start this many bytes off the range asked for
        self.drop_after = drop_after
        self.drops = drops
        self.delay_per_chunk = delay_per_chunk
        self.etag = etag
        self.last_modified = last_modified
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._gets = 0
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """Base address ending in ``/``, e.g. ``http://127.0.0.1:PORT/``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent over all requests so far."""
        with self._lock:
            return sum(r.bytes_sent for r in self.requests)

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _record(self, record: RequestRecord) -> bool:
        """Log a request; return whether this GET is one whose connection should be dropped."""
        with self._lock:
            self.requests.append(record)
            if record.method != "GET":
                return False
            self._gets += 1
            return self.drop_after is not None and self._gets <= self.drops

    def _resolve(self, url_path: str) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path).lstrip("/")
        candidate = (self.root / path).resolve()
        if candidate.is_relative_to(self.root) and candidate.is_file():
            return candidate
        return None

    def _validators(self, file: Path) -> dict[str, str]:
        """The validator headers sent for ``file`` as it is now."""
        headers = {}
        if self.etag:
            headers["ETag"] = '"' + hashlib.sha256(file.read_bytes()).hexdigest()[:32] + '"'
        if self.last_modified:
            headers["Last-Modified"] = email.utils.formatdate(file.stat().st_mtime, usegmt=True)
        return headers


def _make_handler(server: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve(send_body=True)

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

        def _serve(self, *, send_body: bool) -> None:
            record = RequestRecord(self.command, self.path, self.headers.get("Range"), self.headers.get("If-Range"))
            drop = server._record(record)
            file = server._resolve(self.path)
            if file is None:
                record.status = 404
                self.send_error(404, "File not found")
                return
            size = file.stat().st_size
            validators = server._validators(file)
            start, end = 0, size - 1
            match = _RANGE.fullmatch(record.range.strip()) if record.range else None
            # If-Range: the range only applies to the version the client names (exact, strong comparison).
            if match and (record.if_range is None or record.if_range in validators.values()):
                start = max(0, int(match.group(1)) + server.range_shift)
                if match.group(2):
                    end = min(int(match.group(2)), size - 1)
                if start >= size or start > end:
                    record.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                record.status = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                record.status = 200
                self.send_response(200)
            length = end - start + 1
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            for name, value in validators.items():
                self.send_header(name, value)
            self.end_headers()
            if not send_body:
                return
            limit = min(length, server.drop_after) if drop and server.drop_after is not None else length
            self._send_body(file, start, limit, record)
            if limit < length:
                record.dropped = True
                self.close_connection = True  # the client sees EOF before Content-Length is reached

        def _send_body(self, file: Path, start: int, limit: int, record: RequestRecord) -> None:
            with open(file, "rb") as fh:
                fh.seek(start)
                while record.bytes_sent < limit:
                    chunk = fh.read(min(SEND_CHUNK, limit - record.bytes_sent))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True
                        return
                    with server._lock:
                        record.bytes_sent += len(chunk)
                    if server.delay_per_chunk:
                        time.sleep(server.delay_per_chunk)

    return Handler


@contextlib.contextmanager
def serve_directory(root: Path, **options) -> Iterator[FileServer]:
    """Serve the files under ``root`` for the duration of the ``with`` block (options as `FileServer` takes
    them); yields the server."""
    server = FileServer(root, **options).start()
    try:
        yield server
    finally:
        server.stop()
