"""C kernels that ship as source with the package and are compiled on first use (`fused_norm_cpu`,
`fused_ws_cpu`, `winograd_cpu`).

Each source is compiled with the system's C compiler (``$CC``, else ``cc``; about half a second) into the
cache's ``kernels/`` (`checkpoints.cache_dir`), keyed on the source, the flags and the CPU, and loaded
through ctypes: no build step at install time, and no torch headers. Built with -fopenmp, a library binds to
the libgomp that torch has already loaded (same soname), so its parallel loops run in torch's own thread pool:
a second pool would fight torch's threads, which spin for a while after each of its ops. Where no compiler
works, `NativeLibrary.get` returns None after one warning, and its callers run torch's ops instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])  # the second: compilers without -march


class NativeLibrary:
    """One C source, compiled and loaded once per process; `declare` sets its functions' argument types."""

    def __init__(self, source: pathlib.Path, declare: Callable[[ctypes.CDLL], None], what: str,
                 extra_flags: tuple[str, ...] = ()) -> None:
        """`extra_flags` (``-D`` macros, say) go to the compiler after the usual ones: benchmarks build a
        kernel's variants so."""
        self.source, self.declare, self.what, self.extra_flags = source, declare, what, extra_flags
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self.failed = False

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, built into the cache on first use; None (after one warning) where that fails."""
        if self._library is None and not self.failed:
            with self._lock:
                if self._library is None and not self.failed:
                    try:
                        library = ctypes.CDLL(str(self._compile()))
                        self.declare(library)
                        self._library = library
                    except (OSError, subprocess.SubprocessError, RuntimeError, AttributeError) as error:
                        self.failed = True
                        logger.warning("%s unavailable, using torch's ops (%s)", self.what, error)
        return self._library

    def _compile(self) -> pathlib.Path:
        from ..checkpoints.download import cache_dir

        compiler = os.environ.get("CC") or "cc"
        command = shlex.split(compiler)
        source = self.source.read_bytes()
        builds = [(flags, cache_dir() / "kernels" / f"{self.source.stem}-{_key(source, flags)}.so")
                  for flags in (base + list(self.extra_flags) for base in _FLAG_SETS)]
        for _, target in builds:
            if target.exists():  # any compiler's build will do
                return target
        if not command or shutil.which(command[0]) is None:
            raise RuntimeError(f"no C compiler {compiler!r} on PATH (set $CC)")
        errors = []
        for flags, target in builds:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # built aside, then moved in atomically
                built = pathlib.Path(scratch) / target.name
                result = subprocess.run([*command, *flags, "-shared", "-fPIC", str(self.source), "-o", str(built)],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode == 0:
                    os.replace(built, target)
                    return target
                errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-500:]}")
        raise RuntimeError("; ".join(errors))


def _key(source: bytes, flags: list[str]) -> str:
    """The source, the flags and what -march=native depends on: the CPU's model and feature flags (a shared
    cache may serve other CPUs)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        cpu = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cpu.encode()])).hexdigest()[:16]
