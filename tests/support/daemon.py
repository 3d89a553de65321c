"""Run `eventsync` as a separate process, and servers that misbehave on purpose."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support import LOOPBACK, spawn, terminate


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a TOML configuration file from plain section dicts; None leaves a key out."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(
                f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}"
            )
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def run_cli(
    *arguments: str, env: Mapping[str, str] | None = None, timeout_seconds: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m eventsync ARGUMENTS` to completion and capture its output."""
    import os

    environment = dict(os.environ)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "eventsync", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        env=environment,
        check=False,
    )


class DaemonProcess:
    """`eventsync run` in a child process, with its JSON log lines at hand."""

    def __init__(self, config_path: Path, output_path: Path) -> None:
        self.output_path = output_path
        self.process = spawn(
            [sys.executable, "-m", "eventsync", "run", "--config", str(config_path)],
            output_path,
        )

    def lines(self) -> list[dict[str, Any]]:
        """Return the log lines so far, decoded; a line that is not JSON is kept as text."""
        result: list[dict[str, Any]] = []
        for line in self.output_path.read_text(errors="replace").splitlines():
            try:
                result.append(json.loads(line))
            except json.JSONDecodeError:
                result.append({"event": "<not json>", "text": line})
        return result

    def events(self) -> list[str]:
        return [line.get("event", "") for line in self.lines()]

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool] | str,
        timeout_seconds: float = 20.0,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Wait until `count` log lines match; an event name matches by equality."""
        if isinstance(predicate, str):
            name = predicate

            def matches(line: dict[str, Any]) -> bool:
                return line.get("event") == name
        else:
            matches = predicate
        deadline = time.monotonic() + timeout_seconds
        while True:
            found = [line for line in self.lines() if matches(line)]
            if len(found) >= count:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no {count} matching log lines (exit status {self.process.poll()}); "
                    f"output:\n{self.output_path.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.05)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_seconds: float) -> int:
        return self.process.wait(timeout=timeout_seconds)

    def stop(self) -> None:
        terminate(self.process, timeout_seconds=25)


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers.

    It stands in for a DynamoDB endpoint that hangs, so a request waits for the
    client's read timeout.
    """

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((LOOPBACK, 0))
        self._socket.listen(64)
        self._socket.settimeout(0.2)
        self.port: int = self._socket.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._accept, name="silent-server", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_for_connection(self, timeout_seconds: float = 10.0) -> None:
        """Wait until a client has connected, so its request is under way."""
        deadline = time.monotonic() + timeout_seconds
        while not self._connections:
            if time.monotonic() > deadline:
                raise AssertionError(f"no client connected to 127.0.0.1:{self.port}")
            time.sleep(0.02)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._connections.append(connection)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)
        for connection in self._connections:
            connection.close()
        self._socket.close()
