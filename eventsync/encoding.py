"""The JSON encoding that payloads share: compact, UTF-8 and byte-stable."""

from __future__ import annotations

import json
import time
from typing import Any


def format_utc(epoch_seconds: float) -> str:
    """Format an instant as `YYYY-MM-DDTHH:MM:SSZ`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_seconds))


def encode_json(value: Any) -> bytes:
    """Encode `value` as compact UTF-8 JSON, keeping key order as given."""
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def payload_head(target: str) -> bytes:
    """Return the start of a payload, up to and including the `[` of its events."""
    return b'{"version":1,"target":' + encode_json(target) + b',"events":['


# The largest tail a payload can have: a `next_change_at` timestamp and the
# `truncated` flag. Size checks count it so that no payload exceeds its limit.
PAYLOAD_TAIL_MAX = b'],"next_change_at":"0000-00-00T00:00:00Z","truncated":true}'


def envelope_size(target: str) -> int:
    """Return the most bytes a payload for `target` takes besides its events."""
    return len(payload_head(target)) + len(PAYLOAD_TAIL_MAX)
