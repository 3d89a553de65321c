"""The `active_events` table in DynamoDB, through aiobotocore."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    InvalidRegionError,
    NoRegionError,
)

from eventsync.config import DynamoDBSettings
from eventsync.errors import ConfigError, StoreError

TTL_ATTRIBUTE = "expires_at"
_TABLE_ACTIVE_TIMEOUT_SECONDS = 120


def describe_error(error: Exception) -> str:
    """Return a one-line description of an AWS SDK error, without credentials."""
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = details.get("Code", "Unknown")
        message = details.get("Message", "")
        return f"{code}: {message}" if message else str(code)
    return f"{type(error).__name__}: {error}"


def take_scan_items(
    response_dict: dict[str, Any],
    customized_response_dict: dict[str, Any],
    **_: Any,
) -> None:
    """Move the Items of a Scan response past botocore's parser, as decoded JSON.

    A `before-parse.dynamodb.Scan` handler. botocore walks every attribute of
    every item against the output shape, which took about two thirds of a
    sync's CPU time at 100,000 items, and gives back the same typed maps,
    except that Binary values come base64-decoded. eventsync rejects Binary
    attributes whatever their value, so it takes the Items as they were sent
    and lets botocore parse the rest of the body: the paging key and counts.
    """
    if response_dict.get("status_code") != 200:
        return
    try:
        body = json.loads(response_dict["body"])
    except (KeyError, TypeError, ValueError):
        return
    if not isinstance(body, dict) or not isinstance(body.get("Items"), list):
        return
    customized_response_dict["Items"] = body.pop("Items")
    response_dict["body"] = json.dumps(body).encode()


class EventStore:
    """An open DynamoDB client bound to the events table.

    The SDK retries throttling and transient errors in its "standard" mode, up
    to `max_attempts` in all; what still fails is raised as StoreError.
    """

    def __init__(self, settings: DynamoDBSettings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._client: Any = None

    @property
    def table(self) -> str:
        return self._settings.table

    async def __aenter__(self) -> Self:
        config = AioConfig(
            retries={
                "mode": "standard",
                "total_max_attempts": self._settings.max_attempts,
            },
            connect_timeout=self._settings.connect_timeout_seconds,
            read_timeout=self._settings.read_timeout_seconds,
        )
        session = get_session()
        try:
            self._client = await self._stack.enter_async_context(
                session.create_client(
                    "dynamodb",
                    region_name=self._settings.region,
                    endpoint_url=self._settings.endpoint_url,
                    config=config,
                )
            )
        except NoRegionError:
            raise ConfigError(
                "invalid setting dynamodb.region: not set, and the AWS chain has no region; "
                "set it in the configuration file, EVENTSYNC_DYNAMODB__REGION or AWS_REGION"
            ) from None
        except InvalidRegionError as exc:
            # The settings check dynamodb.region, so this one came from AWS_REGION,
            # AWS_DEFAULT_REGION or the AWS config file.
            raise ConfigError(
                f"invalid setting dynamodb.region: the AWS chain gives {exc.kwargs.get('region_name')!r}, "
                "which is not a region name; set dynamodb.region or AWS_REGION to one such as 'eu-west-1'"
            ) from None
        except (BotoCoreError, ValueError) as exc:
            # botocore raises ValueError for an endpoint URL it cannot use, such
            # as one from AWS_ENDPOINT_URL, which the settings do not check.
            # NOTE: a failed fetch of ECS task role credentials also lands here,
            # and so stops start-up with exit status 2 like a bad setting.
            raise ConfigError(
                f"cannot create the DynamoDB client: {describe_error(exc)}; "
                "check the [dynamodb] settings and the AWS environment variables"
            ) from None
        self._client.meta.events.register("before-parse.dynamodb.Scan", take_scan_items)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def scan_pages(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield the items of the whole table, one scan page at a time.

        Raises StoreError when a page cannot be read, so a partly read table
        never passes for the whole one.
        """
        paginator = self._client.get_paginator("scan")
        pages = paginator.paginate(
            TableName=self.table, ConsistentRead=self._settings.consistent_read
        )
        try:
            async for page in pages:
                yield page.get("Items", [])
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(
                f"scan of table {self.table!r} failed: {describe_error(exc)}"
            ) from exc

    async def query_target(self, target: str) -> list[dict[str, Any]]:
        """Return every item of one target."""
        items: list[dict[str, Any]] = []
        paginator = self._client.get_paginator("query")
        pages = paginator.paginate(
            TableName=self.table,
            KeyConditionExpression="#target = :target",
            ExpressionAttributeNames={"#target": "target"},
            ExpressionAttributeValues={":target": {"S": target}},
            ConsistentRead=self._settings.consistent_read,
        )
        try:
            async for page in pages:
                items.extend(page.get("Items", []))
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(
                f"query of target {target!r} failed: {describe_error(exc)}"
            ) from exc
        return items

    async def put_item(self, item: Mapping[str, Any], *, replace: bool = True) -> None:
        """Write one item; with `replace` false, refuse to overwrite an existing one."""
        request: dict[str, Any] = {"TableName": self.table, "Item": dict(item)}
        if not replace:
            request["ConditionExpression"] = "attribute_not_exists(event_id)"
        try:
            await self._client.put_item(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "ConditionalCheckFailedException":
                raise StoreError(
                    f"event target={_key(item, 'target')!r} event_id={_key(item, 'event_id')!r} "
                    "already exists; pass --replace to overwrite it"
                ) from None
            raise StoreError(
                f"put into table {self.table!r} failed: {describe_error(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(
                f"put into table {self.table!r} failed: {describe_error(exc)}"
            ) from exc

    async def delete_item(self, target: str, event_id: str) -> bool:
        """Delete one event; return False when there was no such item."""
        try:
            response = await self._client.delete_item(
                TableName=self.table,
                Key={"target": {"S": target}, "event_id": {"S": event_id}},
                ReturnValues="ALL_OLD",
            )
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(
                f"delete of target {target!r} event_id {event_id!r} failed: {describe_error(exc)}"
            ) from exc
        return bool(response.get("Attributes"))

    async def create_table(self) -> bool:
        """Create the table with TTL on `expires_at`; return False if it existed.

        Running it against an existing table only makes sure TTL is on.
        """
        created = True
        try:
            await self._client.create_table(
                TableName=self.table,
                AttributeDefinitions=[
                    {"AttributeName": "target", "AttributeType": "S"},
                    {"AttributeName": "event_id", "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": "target", "KeyType": "HASH"},
                    {"AttributeName": "event_id", "KeyType": "RANGE"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise StoreError(
                    f"create of table {self.table!r} failed: {describe_error(exc)}"
                ) from exc
            created = False
        except BotoCoreError as exc:
            raise StoreError(
                f"create of table {self.table!r} failed: {describe_error(exc)}"
            ) from exc

        try:
            await self._wait_until_active()
            await self._enable_ttl()
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(
                f"setup of table {self.table!r} failed: {describe_error(exc)}"
            ) from exc
        return created

    async def _wait_until_active(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _TABLE_ACTIVE_TIMEOUT_SECONDS
        while True:
            described = await self._client.describe_table(TableName=self.table)
            status = described["Table"]["TableStatus"]
            if status == "ACTIVE":
                return
            if loop.time() > deadline:
                raise StoreError(
                    f"table {self.table!r} is still {status} after {_TABLE_ACTIVE_TIMEOUT_SECONDS} s"
                )
            await asyncio.sleep(1)

    async def _enable_ttl(self) -> None:
        described = await self._client.describe_time_to_live(TableName=self.table)
        current = described.get("TimeToLiveDescription", {})
        if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
            return
        await self._client.update_time_to_live(
            TableName=self.table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )


def _key(item: Mapping[str, Any], name: str) -> str:
    return str(item.get(name, {}).get("S", "?"))
