"""The parent's side of the benchmark children: start them, read their reports, send commands.

A child runs as `python -m bench.MODULE CONFIG_JSON` from the repository root,
writes one JSON object per line on stdout, its log on stderr, and reads one
command per line on stdin.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.child import ChildConfig
from tests.support import tail

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


class BenchmarkError(RuntimeError):
    """A child failed, or a check of the benchmark's own assumptions failed."""


class ChildProcess:
    """One running child; `async with` starts it and kills it if it is still running."""

    def __init__(self, module: str, config: ChildConfig, log_path: Path) -> None:
        self.module = module
        self._config = config
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        # Every message read so far, in order.
        self.messages: list[dict[str, Any]] = []

    async def __aenter__(self) -> Self:
        with self._log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"bench.{self.module}",
                self._config.to_json(),
                cwd=REPOSITORY_ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    @property
    def pid(self) -> int:
        return self._running().pid

    async def read(self) -> dict[str, Any] | None:
        """Return the next message, or None once the child closed stdout.

        Raises BenchmarkError when the child reports an error.
        """
        process = self._running()
        assert process.stdout is not None
        line = await process.stdout.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        self.messages.append(message)
        if message.get("event") == "error":
            raise BenchmarkError(f"bench.{self.module} failed: {message['message']}")
        return message

    async def expect(self, event: str) -> dict[str, Any]:
        """Read messages until one has `event`, and return it."""
        while True:
            message = await self.read()
            if message is None:
                raise BenchmarkError(
                    f"bench.{self.module} exited before reporting {event!r}\n"
                    f"--- {self._log_path} ---\n{tail(self._log_path)}"
                )
            if message.get("event") == event:
                return message

    async def send(self, command: str) -> None:
        process = self._running()
        assert process.stdin is not None
        process.stdin.write(command.encode() + b"\n")
        await process.stdin.drain()

    async def request(self, command: str, event: str) -> dict[str, Any]:
        """Send `command` and return the next message with `event`."""
        await self.send(command)
        return await self.expect(event)

    async def finish(self) -> None:
        """Read to the end of the output and raise BenchmarkError unless the exit status is 0."""
        while await self.read() is not None:
            pass
        status = await self._running().wait()
        if status != 0:
            raise BenchmarkError(
                f"bench.{self.module} exited with status {status}\n"
                f"--- {self._log_path} ---\n{tail(self._log_path)}"
            )

    def _running(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RuntimeError(f"bench.{self.module} is not started: use async with")
        return self._process


async def run_child(
    module: str,
    config: ChildConfig,
    log_path: Path,
    on_message: Callable[[dict[str, Any], ChildProcess], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Run a child to its end and return its messages; `on_message` gets each one first."""
    async with ChildProcess(module, config, log_path) as child:
        while (message := await child.read()) is not None:
            if on_message is not None:
                await on_message(message, child)
        await child.finish()
    return child.messages
