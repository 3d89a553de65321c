"""The DynamoDB emulator the benchmark scans: dynalite when Node.js is present, else moto.

On the 2-core AMD EPYC machine of docs/benchmarks.md, moto's server took 7.0 s
of wall time to serve a full scan of 10,000 items and dynalite under 0.5 s, so
dynalite is the default wherever `node` is on PATH. Both listen on a free port
of 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path

from tests.support import (
    LOOPBACK,
    file_size,
    find_free_port,
    read_from,
    spawn,
    terminate,
)
from tests.support.dynamo import MotoServer

BENCH_DIR = Path(__file__).resolve().parent
DYNALITE_CLI = BENCH_DIR / "node_modules" / "dynalite" / "cli.js"
LOCK_FILE = BENCH_DIR / "package-lock.json"
# npm writes the packages it installed here, in the lock file's format.
INSTALLED_LOCK_FILE = BENCH_DIR / "node_modules" / ".package-lock.json"
INSTALL_HINT = "npm ci --prefix bench"
NPM_CI_TIMEOUT_SECONDS = 600
_MAX_PORT_ATTEMPTS = 3


class EmulatorError(RuntimeError):
    """The emulator is missing, exited, or did not answer in time."""


class DynaliteServer:
    """dynalite (DynamoDB on LevelDB) with in-memory storage on 127.0.0.1.

    dynalite binds every interface unless given `--host`, and keeps its data
    in memory unless given `--path`.
    """

    name = "dynalite"

    def __init__(self, workdir: Path, *, start_timeout_seconds: float = 30.0) -> None:
        node = shutil.which("node")
        if node is None:
            raise EmulatorError(
                "node not found on PATH: dynalite needs Node.js 20 or newer"
            )
        if not DYNALITE_CLI.is_file():
            raise EmulatorError(
                f"dynalite is not installed in {DYNALITE_CLI.parent.parent}:"
                f" run `{INSTALL_HINT}` from the repository root"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self._node = node
        self.output_path = workdir / "dynalite.log"
        self._start_timeout_seconds = start_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def endpoint_url(self) -> str:
        if self._port is None:
            raise RuntimeError("dynalite has no port yet: call start() first")
        return f"http://{LOOPBACK}:{self._port}"

    def version(self) -> str:
        package = json.loads((DYNALITE_CLI.parent / "package.json").read_text())
        node = subprocess.run(
            [self._node, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return f"dynalite {package['version']} on Node.js {node}"

    def start(self) -> None:
        """Start dynalite and wait until it answers an HTTP request."""
        for _attempt in range(_MAX_PORT_ATTEMPTS):
            self._port = find_free_port()
            offset = file_size(self.output_path)
            process = spawn(
                [
                    self._node,
                    str(DYNALITE_CLI),
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(self._port),
                    # Tables become ACTIVE at once instead of after 500 ms.
                    "--createTableMs",
                    "0",
                ],
                self.output_path,
            )
            self._process = process
            if self._wait_until_ready(process):
                return
            terminate(process)
            self._process = None
            output = read_from(self.output_path, offset)
            if "EADDRINUSE" not in output:
                raise EmulatorError(
                    f"dynalite on {self.endpoint_url} did not start\n"
                    f"--- {self.output_path} ---\n{output}"
                )
        raise EmulatorError(
            f"dynalite found no free port in {_MAX_PORT_ATTEMPTS} attempts"
        )

    def stop(self) -> None:
        if self._process is not None:
            terminate(self._process)
            self._process = None

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + self._start_timeout_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.1)
        return False

    def _answers(self) -> bool:
        # An unsigned request gets dynalite's MissingAuthenticationToken error,
        # which tells it apart from another server that took the port.
        assert self._port is not None
        connection = http.client.HTTPConnection(LOOPBACK, self._port, timeout=1)
        try:
            connection.request(
                "POST",
                "/",
                body=b"{}",
                headers={
                    "Content-Type": "application/x-amz-json-1.0",
                    "X-Amz-Target": "DynamoDB_20120810.ListTables",
                },
            )
            body = connection.getresponse().read()
        except OSError:
            return False
        finally:
            connection.close()
        return b"MissingAuthenticationToken" in body


class MotoEmulator:
    """moto's server, through the test suite's MotoServer."""

    name = "moto"

    def __init__(self, workdir: Path) -> None:
        self._server = MotoServer(workdir)

    @property
    def endpoint_url(self) -> str:
        return self._server.endpoint_url

    def version(self) -> str:
        from importlib.metadata import version

        return f"moto {version('moto')} server (Python)"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


Emulator = DynaliteServer | MotoEmulator


def resolve_choice(choice: str) -> str:
    """Return "dynalite" or "moto" for `choice`; "auto" takes dynalite when `node` is on PATH."""
    if choice == "auto":
        return "dynalite" if shutil.which("node") else "moto"
    if choice in ("dynalite", "moto"):
        return choice
    raise ValueError(f"invalid emulator {choice!r}: use auto, dynalite or moto")


def dynalite_installed() -> bool:
    """Tell whether bench/node_modules holds exactly the packages of the lock file."""
    if not DYNALITE_CLI.is_file():
        return False
    try:
        locked = json.loads(LOCK_FILE.read_text())["packages"]
        installed = json.loads(INSTALLED_LOCK_FILE.read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return False
    # The lock file's "" entry is the benchmark package itself, not a dependency.
    dependencies = {name: entry for name, entry in locked.items() if name}
    return bool(dependencies == installed)


def install_dynalite() -> None:
    """Run `npm ci` in bench/, which installs the locked dynalite and its dependencies.

    Raises EmulatorError with npm's output when npm is missing or fails.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise EmulatorError(
            "npm not found on PATH: install Node.js 20 or newer with npm,"
            " or pass --emulator moto"
        )
    try:
        completed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EmulatorError(
            f"npm ci in {BENCH_DIR} timed out after {NPM_CI_TIMEOUT_SECONDS} s"
        ) from None
    if completed.returncode != 0 or not dynalite_installed():
        raise EmulatorError(
            f"npm ci in {BENCH_DIR} failed with status {completed.returncode}:\n"
            f"{completed.stdout}{completed.stderr}"
        )


def create_emulator(choice: str, workdir: Path) -> Emulator:
    """Return the emulator for `choice`, "dynalite" or "moto", without starting it."""
    if choice == "dynalite":
        return DynaliteServer(workdir)
    if choice == "moto":
        return MotoEmulator(workdir)
    raise ValueError(f"invalid emulator {choice!r}: use dynalite or moto")
