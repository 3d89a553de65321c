"""The Docker image and the compose stack, checked end to end by ci/container-test.

The script installs and starts a Docker engine when one is missing (as root).
It builds local stand-ins for the Docker Hub images and the eventsync image,
runs the compose stack with docker-compose.ci.yml, and checks the retained
payloads, the health check and a clean stop. It exits 77 when the Docker
engine cannot start on the machine, which this test reports as a skip.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTAINER_TEST = ROOT / "ci" / "container-test"
EXIT_SKIP = 77
# From a machine with nothing installed, the script took 151 s on 2 cores
# (docs/container.md). The limit leaves room for slow mirrors.
SCRIPT_TIMEOUT_SECONDS = 1500
OUTPUT_TAIL_LINES = 150


def _tail(output: str) -> str:
    return "\n".join(output.splitlines()[-OUTPUT_TAIL_LINES:])


def _timings(output: str) -> str:
    lines = output.splitlines()
    try:
        start = lines.index("container-test: timings:")
    except ValueError:
        return ""
    return "\n".join(
        line for line in lines[start:] if line.startswith("container-test:")
    )


@pytest.mark.container
@pytest.mark.timeout(SCRIPT_TIMEOUT_SECONDS + 180)
def test_image_and_compose_stack(capsys: pytest.CaptureFixture[str]) -> None:
    # A process group of its own lets a timeout stop the script together with
    # the docker commands it runs. SIGTERM makes the script tear the stack down.
    process = subprocess.Popen(
        ["bash", str(CONTAINER_TEST)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=SCRIPT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        pytest.fail(
            f"ci/container-test timed out after {SCRIPT_TIMEOUT_SECONDS} s; last lines:\n{_tail(output)}"
        )

    # The full output lands in the report's captured stdout when the test fails.
    print(output)
    with capsys.disabled():
        print("\n" + _timings(output))

    if process.returncode == EXIT_SKIP:
        reasons = re.findall(r"^install-docker: (.+)$", output, flags=re.MULTILINE)
        reason = (
            reasons[-1] if reasons else "the Docker engine cannot start on this machine"
        )
        pytest.skip(f"Docker engine unavailable: {reason}")
    assert process.returncode == 0, (
        f"ci/container-test exited with status {process.returncode}; last lines:\n{_tail(output)}"
    )
