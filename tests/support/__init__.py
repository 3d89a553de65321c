"""Real services for the tests: a test PKI, mosquitto, a moto DynamoDB server.

This module contains the process plumbing that the broker and the moto server share.
Every server started here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal
import socket
import subprocess
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"

# The Debian mosquitto service on this port belongs to other users of the machine.
RESERVED_PORTS = frozenset({1883})

_PR_SET_PDEATHSIG = 1


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is released before returning, so another process can take it
    before the caller binds it. Callers retry with a new port when that happens.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def tcp_port_accepts(host: str, port: int, timeout_seconds: float = 0.2) -> bool:
    """Return whether a TCP connection to `host`:`port` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds):
            return True
    except OSError:
        return False


def tail(path: Path, max_lines: int = 30) -> str:
    """Return the last `max_lines` lines of a text file, or a note if it is missing."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(lines[-max_lines:])


def file_size(path: Path) -> int:
    """Return the size of `path` in bytes, or 0 if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_from(path: Path, offset: int) -> str:
    """Return the text of `path` from byte `offset` on, or "" if it does not exist."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _kill_with_parent() -> None:
    # Runs in the child between fork and exec. If the test run dies without
    # tearing down its fixtures (for example pytest-timeout's os._exit), the
    # kernel sends SIGTERM to the server. The kernel tracks the thread that
    # forked, so start servers from the main thread, as pytest fixtures do.
    # NOTE: Linux only; elsewhere a server outlives a run that skips teardown.
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(args: list[str], output_path: Path) -> subprocess.Popen[bytes]:
    """Start `args` with stdout and stderr appended to `output_path`."""
    with output_path.open("ab") as output:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_kill_with_parent if sys.platform == "linux" else None,
        )


def terminate(process: subprocess.Popen[bytes], timeout_seconds: float = 5.0) -> None:
    """Send SIGTERM, wait up to `timeout_seconds`, then SIGKILL and reap."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        kill(process)


def kill(process: subprocess.Popen[bytes]) -> None:
    """Send SIGKILL and reap the process."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()
