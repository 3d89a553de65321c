"""Tests of the Scan response handler that bypasses botocore's item parsing."""

from __future__ import annotations

import json
from typing import Any

from eventsync.store import take_scan_items

ITEMS = [{"target": {"S": "lobby"}, "event_id": {"S": "a"}, "data": {"B": "eA=="}}]


def scan_response(status: int, body: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {"status_code": status, "headers": {}, "body": raw}


def test_take_scan_items_moves_items() -> None:
    body = {"Items": ITEMS, "Count": 1, "LastEvaluatedKey": {"target": {"S": "x"}}}
    response = scan_response(200, body)
    customized: dict[str, Any] = {}

    take_scan_items(response_dict=response, customized_response_dict=customized)

    assert customized == {"Items": ITEMS}
    assert json.loads(response["body"]) == {
        "Count": 1,
        "LastEvaluatedKey": {"target": {"S": "x"}},
    }


def test_take_scan_items_leaves_errors() -> None:
    body = {"__type": "ThrottlingException", "message": "slow down"}
    response = scan_response(400, body)
    customized: dict[str, Any] = {}

    take_scan_items(response_dict=response, customized_response_dict=customized)

    assert customized == {}
    assert json.loads(response["body"]) == body


def test_take_scan_items_leaves_unreadable_body() -> None:
    response = scan_response(200, b"<html>proxy error</html>")
    customized: dict[str, Any] = {}

    take_scan_items(response_dict=response, customized_response_dict=customized)

    assert customized == {}
    assert response["body"] == b"<html>proxy error</html>"


def test_take_scan_items_without_items() -> None:
    response = scan_response(200, {"Count": 0})
    customized: dict[str, Any] = {}

    take_scan_items(response_dict=response, customized_response_dict=customized)

    assert customized == {}
    assert json.loads(response["body"]) == {"Count": 0}
