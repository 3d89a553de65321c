"""Faults the daemon must ride out: a broker that is down, a clashing client id,
bad certificates, and what must never reach the logs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import LOOPBACK
from tests.support.broker import MosquittoBroker
from tests.support.daemon import DaemonProcess, run_cli
from tests.support.mqtt import read_retained
from tests.support.pki import Pki

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def test_broker_down_at_startup_retries_then_publishes(
    seeded_table: str,
    broker_factory: Callable[..., MosquittoBroker],
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    pki: Pki,
) -> None:
    broker = broker_factory(start=False)
    broker.start()
    port = broker.port
    broker.stop()
    config = daemon_config(mqtt={"port": port, "reconnect_max_seconds": 1})
    daemon = start_daemon(config)

    daemon.wait_for("mqtt_connect_failed", count=4, timeout_seconds=15)
    cpu_before = cpu_seconds(daemon.process.pid)
    time.sleep(3)
    cpu_during_outage = cpu_seconds(daemon.process.pid) - cpu_before
    attempts = daemon.wait_for("mqtt_reconnecting")
    failures = daemon.wait_for("sync_failed")
    broker.start()
    published = daemon.wait_for(
        lambda line: line.get("event") == "sync_completed" and line["published"] == 2,
        timeout_seconds=15,
    )
    retained = read_retained_sync(broker, pki)

    assert daemon.process.poll() is None
    assert cpu_during_outage < 1.0
    assert max(line["delay_seconds"] for line in attempts) <= 1.0
    assert "not connected" in failures[0]["error"]
    assert published[0]["failed"] == 0
    assert sorted(retained) == ["events/lobby", "events/room-101"]


def read_retained_sync(broker: MosquittoBroker, pki: Pki) -> dict[str, bytes]:
    return asyncio.run(read_retained(broker.host, broker.port, pki, "events/#"))


def test_same_client_id_reported_as_conflict(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    config = daemon_config(
        mqtt={
            "client_id": "shared-id",
            "reconnect_min_seconds": 0.2,
            "reconnect_max_seconds": 0.5,
        },
        sync={"interval_seconds": 3600},
    )
    first = start_daemon(config)
    first.wait_for("mqtt_connected")
    second = start_daemon(config)

    conflicts = first.wait_for("mqtt_client_id_conflict", timeout_seconds=30)
    second.wait_for("mqtt_client_id_conflict", timeout_seconds=30)

    assert conflicts[0]["level"] == "error"
    assert conflicts[0]["client_id"] == "shared-id"
    assert "same client id" in conflicts[0]["reason"]
    assert first.process.poll() is None
    assert second.process.poll() is None


@pytest.mark.parametrize(
    ("days", "offset_days", "expected"),
    [(30, -40, "expired"), (30, 5, "not valid before")],
)
def test_certificate_outside_validity_rejected(
    daemon_config: Callable[..., Path],
    pki: Pki,
    days: int,
    offset_days: int,
    expected: str,
) -> None:
    cert, key = pki.issue_client("dated", days=days, not_before_offset_days=offset_days)
    config = daemon_config(mqtt={"cert_file": cert, "key_file": key})

    result = run_cli("run", "--config", str(config), timeout_seconds=20)

    assert result.returncode == 2
    assert "mqtt.cert_file" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_certificate_path_is_folder_rejected(
    daemon_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = daemon_config(mqtt={"ca_file": tmp_path})

    result = run_cli("run", "--config", str(config), timeout_seconds=20)

    assert result.returncode == 2
    assert "is a folder" in result.stderr


def test_certificate_not_pem_rejected(
    daemon_config: Callable[..., Path], tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    config = daemon_config(mqtt={"cert_file": garbage})

    result = run_cli("run", "--config", str(config), timeout_seconds=20)

    assert result.returncode == 2
    assert "garbage.crt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_ca_names_verification_failure(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    pki: Pki,
) -> None:
    daemon = start_daemon(daemon_config(mqtt={"ca_file": pki.other_ca_cert}))

    failures = daemon.wait_for("mqtt_connect_failed")

    assert "certificate verify failed" in failures[0]["error"]
    assert daemon.process.poll() is None


def test_key_readable_by_others_warns(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    pki: Pki,
    tmp_path: Path,
) -> None:
    key = tmp_path / "shared.key"
    key.write_bytes(pki.client_key_pkcs1.read_bytes())
    key.chmod(0o644)
    daemon = start_daemon(daemon_config(mqtt={"key_file": key}))

    warnings = daemon.wait_for("certificate_warning")
    daemon.wait_for("sync_completed")

    assert "readable by other users" in warnings[0]["warning"]
    assert "644" in warnings[0]["warning"]


def test_private_key_quiet_when_restricted(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    pki: Pki,
    tmp_path: Path,
) -> None:
    key = tmp_path / "private.key"
    key.write_bytes(pki.client_key_pkcs1.read_bytes())
    key.chmod(0o600)
    daemon = start_daemon(daemon_config(mqtt={"key_file": key}))

    daemon.wait_for("sync_completed")

    assert "certificate_warning" not in daemon.events()


def test_hostname_mismatch_rejected_unless_insecure(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    broker: MosquittoBroker,
) -> None:
    # "127.1" reaches 127.0.0.1, but the broker certificate names only
    # "localhost" and "127.0.0.1", so the host name check fails on it.
    strict = start_daemon(daemon_config(mqtt={"host": "127.1"}))
    strict_failure = strict.wait_for("mqtt_connect_failed")
    strict.stop()

    insecure = start_daemon(
        daemon_config(
            mqtt={"host": "127.1", "insecure_skip_hostname_verification": True}
        )
    )
    completed = insecure.wait_for("sync_completed")
    warnings = [line for line in insecure.lines() if line["event"] == "insecure_tls"]

    assert "Hostname mismatch" in strict_failure[0]["error"]
    assert completed[0]["published"] == 2
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


class OldTlsServer:
    """A TLS server on 127.0.0.1 that speaks nothing newer than TLS 1.1."""

    def __init__(self, pki: Pki) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context.minimum_version = ssl.TLSVersion.TLSv1
        self.context.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 forbids TLS 1.1 at the default security level.
        self.context.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.socket = socket.socket()
        self.socket.bind((LOOPBACK, 0))
        self.socket.listen(8)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.handshake_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with self.context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError) as exc:
                self.handshake_errors.append(str(exc))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.socket.close()


@pytest.fixture
def old_tls_server(pki: Pki) -> Iterator[OldTlsServer]:
    server = OldTlsServer(pki)
    yield server
    server.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_refused(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    old_tls_server: OldTlsServer,
) -> None:
    daemon = start_daemon(daemon_config(mqtt={"port": old_tls_server.port}))

    failures = daemon.wait_for("mqtt_connect_failed")

    error = failures[0]["error"].lower()
    assert "protocol" in error or "version" in error
    assert "mqtt_connected" not in daemon.events()
    assert old_tls_server.handshake_errors != []


def test_logs_hold_no_secrets_at_debug(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    pki: Pki,
    tmp_path: Path,
) -> None:
    secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
    config = daemon_config(log={"level": "debug"})
    output = tmp_path / "debug.log"
    environment = {
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
        "AWS_SESSION_TOKEN": "SESSIONTOKENVALUE",
    }
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        daemon = DaemonProcess(config, output)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        daemon.wait_for("sync_completed", count=2)
    finally:
        daemon.stop()

    text = output.read_text()
    key_lines = [
        line
        for line in pki.client_key_pkcs1.read_text().splitlines()
        if "-----" not in line
    ]
    lines = [json.loads(line) for line in text.splitlines()]

    assert secret_access_key not in text
    assert "SESSIONTOKENVALUE" not in text
    assert all(key_line not in text for key_line in key_lines)
    assert '"events":[' not in text
    assert any(line["event"] == "runtime_stats" for line in lines)
