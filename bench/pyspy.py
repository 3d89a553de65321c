"""Profile a benchmark child with py-spy and sort its samples into categories.

The parent attaches py-spy to the eventsync child for a few extra, unmeasured
warm syncs. Attaching from the parent works under the default Yama ptrace
scope, which lets a process trace its descendants only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 60.0
SAMPLES_PER_SECOND = 100
INSTALL_HINT = ".venv/bin/pip install py-spy"

# Categories of a sample, tried from the innermost frame outwards: the first
# frame whose file path contains one of the markers decides. A C function
# such as marshal.dumps has no frame, so its time counts for the Python
# function that called it.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "eventsync: parse items, match unchanged ones (events.py)",
        ("eventsync/events.py",),
    ),
    (
        "eventsync: build payloads and digests (payloads.py, encoding.py)",
        ("eventsync/payloads.py", "eventsync/encoding.py"),
    ),
    (
        "eventsync: sync loop, cache, logging (sync.py, cache.py, logs.py)",
        ("eventsync/",),
    ),
    ("json: decode the response bodies", ("json/decoder.py",)),
    (
        "botocore: convert the decoded JSON to the Scan output shape",
        ("botocore/parsers.py",),
    ),
    (
        "botocore and aiohttp: requests, signing, HTTP",
        ("botocore/", "aiohttp/", "yarl/", "multidict/"),
    ),
    ("asyncio: event loop and sockets", ("asyncio/", "selectors.py")),
    ("aiomqtt and paho: MQTT", ("aiomqtt/", "paho/")),
    ("structlog", ("structlog/",)),
)
OTHER = "other"
_FRAME = re.compile(r"\((?P<path>[^()]*):\d+\)$")


class ProfilerError(RuntimeError):
    """py-spy is missing, could not attach, or wrote no profile."""


def find_py_spy() -> str:
    """Return the py-spy executable beside this Python or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfilerError(f"py-spy not found: install it with `{INSTALL_HINT}`")
    return found


class PySpyRecorder:
    """`py-spy record --format raw` attached to one process until stop()."""

    def __init__(self, output_path: Path, log_path: Path) -> None:
        self.output_path = output_path
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, pid: int) -> None:
        """Attach to `pid` and return once py-spy samples it."""
        self._process = await asyncio.create_subprocess_exec(
            find_py_spy(),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(SAMPLES_PER_SECOND),
            # Sampling without pausing the process keeps its timing closer
            # to an unprofiled run.
            "--nonblocking",
            "--output",
            str(self.output_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self._process.stdout is not None
        output = b""
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                while b"Sampling process" not in output:
                    line = await self._process.stdout.readline()
                    if not line:
                        break
                    output += line
        except TimeoutError:
            pass
        if b"Sampling process" not in output:
            await self._end()
            raise ProfilerError(
                f"py-spy did not attach to process {pid}: {output.decode(errors='replace')}"
            )

    async def stop(self) -> None:
        """Stop sampling as Control-C does, which makes py-spy write its output."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        assert self._process.stdout is not None
        try:
            async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                rest = await self._process.stdout.read()
                await self._process.wait()
        except TimeoutError:
            rest = b""
        finally:
            await self._end()
        self._log_path.write_bytes(rest)
        if not self.output_path.is_file():
            raise ProfilerError(
                f"py-spy wrote no profile to {self.output_path}: {rest.decode(errors='replace')}"
            )

    async def _end(self) -> None:
        process = self._process
        self._process = None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def categorize(raw_path: Path) -> tuple[dict[str, int], int]:
    """Return the samples per category of a `py-spy --format raw` file, and their total."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        counts[_category(stack.split(";"))] += samples
    ordered = {name: counts[name] for name, _ in CATEGORIES if counts[name]}
    if counts[OTHER]:
        ordered[OTHER] = counts[OTHER]
    return ordered, total


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME.search(frame)
        if match is None:
            continue
        path = match["path"]
        for name, markers in CATEGORIES:
            if any(marker in path for marker in markers):
                return name
    return OTHER
