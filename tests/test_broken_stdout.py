"""`eventsync run` after the reader of its stdout goes away.

A log reader that exits (such as `eventsync run | tee FILE` when tee dies)
leaves the daemon's stdout a pipe without a reader, so every later write
fails with EPIPE. The daemon must keep syncing and must still stop on
SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import kill


def _wait_for_heartbeat_after(
    heartbeat: Path,
    after_seconds: float,
    process: subprocess.Popen[bytes],
    timeout_seconds: float,
) -> bool:
    """Return whether the heartbeat's mtime passes `after_seconds` (epoch) in time."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and process.poll() is None:
        if heartbeat.exists() and heartbeat.stat().st_mtime > after_seconds:
            return True
        time.sleep(0.1)
    return False


def _run_with_closed_stdout(
    config_path: Path, heartbeat: Path, stderr_path: Path
) -> tuple[bytes, bool, int | None]:
    """Start the daemon, close its stdout reader, then send SIGTERM.

    Returns the first stdout line, whether a sync completed after the close,
    and the exit status (None when the daemon outlived SIGTERM by 30 s).
    """
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "eventsync", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        # Closing the only reader makes every later write to stdout fail with EPIPE.
        process.stdout.close()
        closed_at = time.time()

        # The schedule fires every second, so a sync that completes after the
        # close refreshes the heartbeat well within the deadline.
        synced_after_close = _wait_for_heartbeat_after(
            heartbeat, closed_at + 1, process, timeout_seconds=30
        )
        process.send_signal(signal.SIGTERM)
        try:
            status: int | None = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = None
    finally:
        kill(process)
    return first_line, synced_after_close, status


async def test_daemon_survives_closed_stdout(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    stderr_path = tmp_path / "stderr.log"
    first_line, synced_after_close, status = await asyncio.to_thread(
        _run_with_closed_stdout,
        daemon_config(),
        tmp_path / "heartbeat",
        stderr_path,
    )
    stderr_tail = stderr_path.read_text(errors="replace")[-3000:]

    assert json.loads(first_line)["event"] == "startup"
    assert synced_after_close, stderr_tail
    assert status == 0, stderr_tail
