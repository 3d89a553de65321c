"""Run a private mosquitto broker with a mutual-TLS listener on a free port."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from . import (
    LOOPBACK,
    RESERVED_PORTS,
    file_size,
    find_free_port,
    kill,
    read_from,
    spawn,
    tail,
    tcp_port_accepts,
    terminate,
)
from .pki import Pki

# Debian installs the broker in /usr/sbin, which is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
)
_ADDRESS_IN_USE = "Address already in use"
_RUNNING_LINE = re.compile(r"mosquitto version \S+ running")
_MAX_PORT_ATTEMPTS = 5


class BrokerStartError(RuntimeError):
    """mosquitto exited or did not accept connections in time."""


class MosquittoBroker:
    """A mosquitto process that requires client certificates signed by `pki`.

    mosquitto 2.0 reads `tls_version tlsv1.2` as a minimum, so the listener
    accepts TLS 1.2 and 1.3 and rejects 1.1 (checked against 2.0.11). With
    `use_identity_as_username`, a client's certificate common name is its
    username, which is what ACL lines in `extra_config` match on.
    """

    host = "localhost"

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        *,
        extra_config: Sequence[str] = (),
        port: int | None = None,
        start_timeout_seconds: float = 10.0,
    ) -> None:
        """Prepare a broker in `workdir` without starting it.

        `extra_config` lines are appended to the generated mosquitto.conf.
        Without `port`, `start()` picks a free one and keeps it for restarts.
        """
        if port in RESERVED_PORTS:
            raise ValueError(f"port {port} is reserved for the machine's own broker")
        for line in extra_config:
            if "\n" in line or "\r" in line:
                raise ValueError(f"invalid config line {line!r}: contains a newline")

        executable = shutil.which("mosquitto", path=_SEARCH_PATH)
        if executable is None:
            raise BrokerStartError(
                "mosquitto not found on PATH or in /usr/sbin: install the Debian"
                " package mosquitto"
            )

        self._executable = executable
        self._pki = pki
        self._extra_config = list(extra_config)
        self._port = port
        self._port_fixed = port is not None
        self._start_timeout_seconds = start_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._output_offset = 0

        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        # Messages printed before the log file is open (config errors) land here.
        self.output_path = workdir / "mosquitto.out"

        paths = [workdir, pki.ca_cert, pki.server_cert, pki.server_key]
        for path in paths:
            if any(character.isspace() for character in str(path)):
                raise ValueError(
                    f"invalid path {path}: mosquitto.conf values cannot contain"
                    " whitespace, so set a temporary directory without spaces"
                )

    @property
    def port(self) -> int:
        """TCP port of the TLS listener on 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("the broker has no port yet: call start() first")
        return self._port

    @property
    def is_running(self) -> bool:
        """Whether the mosquitto process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until its TLS port accepts a TCP connection.

        The probe connection closes without a TLS handshake, so the log gets an
        OpenSSL "unexpected eof while reading" error for it. Raises
        BrokerStartError with the end of the broker log when mosquitto
        exits or does not accept a connection within the start timeout.
        """
        if self.is_running:
            raise RuntimeError(f"the broker on port {self.port} is already running")

        for attempt in range(1, _MAX_PORT_ATTEMPTS + 1):
            if self._port is None:
                self._port = find_free_port()
            try:
                self._start_once()
            except BrokerStartError:
                # Another process can take the port between find_free_port()
                # and mosquitto's bind(). Only a port this class picked itself
                # may be replaced.
                in_use = _ADDRESS_IN_USE in self._output_since_start()
                if self._port_fixed or not in_use or attempt == _MAX_PORT_ATTEMPTS:
                    raise
                self._port = None
            else:
                self._port_fixed = True
                return

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Send SIGTERM, wait up to `timeout_seconds`, then SIGKILL."""
        if self._process is not None:
            terminate(self._process, timeout_seconds)
            self._process = None

    def kill(self) -> None:
        """Send SIGKILL, as for a broker that crashes."""
        if self._process is not None:
            kill(self._process)
            self._process = None

    def restart(self) -> None:
        """Stop the broker and start it again on the same port.

        Retained messages are lost, because the configuration sets
        `persistence false`, unless `extra_config` turns persistence on with a
        `persistence_location`: mosquitto takes the last value of a repeated
        option.
        """
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Return the broker log so far, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_log(self, text: str, timeout_seconds: float = 5.0) -> str:
        """Wait until the broker log contains `text` and return the whole log.

        mosquitto can write a line after the client has seen the event it
        reports, so tests poll with this instead of reading the log once.
        """
        deadline = time.monotonic() + timeout_seconds
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{text!r} did not appear in {self.log_path} within"
                    f" {timeout_seconds} s; last lines:\n{tail(self.log_path)}"
                )
            await asyncio.sleep(0.05)

    def _start_once(self) -> None:
        self._write_config()
        self._log_offset = file_size(self.log_path)
        self._output_offset = file_size(self.output_path)

        process = spawn(
            [self._executable, "-c", str(self.config_path)], self.output_path
        )
        self._process = process
        deadline = time.monotonic() + self._start_timeout_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise BrokerStartError(
                    f"mosquitto exited with status {process.returncode} while"
                    f" starting on port {self._port}\n{self._diagnostics()}"
                )

            # The "running" line comes after every listener is bound, so a
            # connection after it reaches this mosquitto and not a process
            # that took the port first.
            log = read_from(self.log_path, self._log_offset)
            if _RUNNING_LINE.search(log) and tcp_port_accepts(LOOPBACK, self.port):
                return
            time.sleep(0.05)

        kill(process)
        self._process = None
        raise BrokerStartError(
            f"mosquitto did not accept connections on {LOOPBACK}:{self._port} within"
            f" {self._start_timeout_seconds} s\n{self._diagnostics()}"
        )

    def _write_config(self) -> None:
        lines = [
            "# Generated by tests/support/broker.py for one test.",
            # Running as root, mosquitto would otherwise switch to the
            # `mosquitto` user, which cannot read the test's temporary directory.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type all",
            f"listener {self.port} {LOOPBACK}",
            f"cafile {self._pki.ca_cert}",
            f"certfile {self._pki.server_cert}",
            f"keyfile {self._pki.server_key}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            # Every accepted client has a username from its certificate, so
            # none is anonymous.
            "allow_anonymous false",
            *self._extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _output_since_start(self) -> str:
        return read_from(self.output_path, self._output_offset) + read_from(
            self.log_path, self._log_offset
        )

    def _diagnostics(self) -> str:
        return (
            f"--- {self.output_path} (stdout and stderr) ---\n"
            f"{tail(self.output_path)}\n"
            f"--- {self.log_path} (last lines) ---\n"
            f"{tail(self.log_path)}"
        )


class BrokerFactory(Protocol):
    """Signature of the `broker_factory` fixture."""

    def __call__(
        self, extra_config: Sequence[str] = (), *, start: bool = True
    ) -> MosquittoBroker: ...
