"""Create the active_events table and put sample events for lobby and room-101.

LocalStack runs this file once DynamoDB is ready (it executes the scripts in
/etc/localstack/init/ready.d/ inside its own Python process, which has boto3).
The moto stand-in that CI uses instead of LocalStack runs the same file with
`python`. Event times are relative to the moment the script runs, so the stack
always has an event happening now, one later today, one tomorrow, one that has
ended and one past the default seven-day lookahead.

Environment:
  SAMPLE_DATA_ENDPOINT_URL  DynamoDB endpoint (default http://localhost:4566)
  SAMPLE_DATA_READY_FILE    file to create once the data is in; the compose
                            health check waits for it (default: none)

LocalStack executes the file with empty globals, so there is no __name__ or
__file__ and the code runs at module level.
"""

import os
import time
from datetime import datetime, timezone

import boto3

TABLE = "active_events"
REGION = "us-east-1"
MINUTE = 60
HOUR = 3600
DAY = 86400
# DynamoDB TTL may delete an item once expires_at has passed. Setting it a day
# after the event ends keeps ended events in the table for a while.
EXPIRES_AFTER_END = DAY


def iso(epoch_seconds):
    """Format epoch seconds as ISO 8601 UTC, for example 2026-12-04T15:00:00Z."""
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sample_events(now):
    """Build the sample items, with times as ISO 8601 strings and as epoch-second numbers."""
    # Whole minutes keep the payloads readable.
    now = now - now % MINUTE
    events = [
        {
            "target": "lobby",
            "event_id": "welcome-coffee",
            "title": "Welcome coffee",
            "description": "Coffee and pastries for visitors.",
            "location": "Lobby",
            "starts_at": iso(now - 30 * MINUTE),
            "ends_at": iso(now + 90 * MINUTE),
        },
        {
            "target": "lobby",
            "event_id": "product-demo",
            "title": "Product demo",
            "location": "Lobby screen",
            "starts_at": iso(now + 3 * HOUR),
            "ends_at": iso(now + 4 * HOUR),
            "data": {"presenter": "Sales team", "seats": 40},
        },
        {
            "target": "lobby",
            "event_id": "all-hands",
            "title": "All hands",
            "starts_at": now + DAY,
            "ends_at": now + DAY + HOUR,
            "data": {"stream": True, "tags": ["company", "monthly"]},
        },
        {
            "target": "lobby",
            "event_id": "fire-drill",
            "title": "Fire drill",
            "description": "Ended two hours ago; eventsync leaves it out.",
            "starts_at": iso(now - 3 * HOUR),
            "ends_at": iso(now - 2 * HOUR),
        },
        {
            "target": "room-101",
            "event_id": "design-review",
            "title": "Design review",
            "location": "Room 101",
            "starts_at": now - 15 * MINUTE,
            "ends_at": now + 45 * MINUTE,
            "data": {"organizer": "platform team", "video_call": True},
        },
        {
            "target": "room-101",
            "event_id": "sprint-planning",
            "title": "Sprint planning",
            "location": "Room 101",
            "starts_at": iso(now + DAY + 2 * HOUR),
            "ends_at": iso(now + DAY + 4 * HOUR),
        },
        {
            "target": "room-101",
            "event_id": "quarterly-review",
            "title": "Quarterly review",
            "description": "Ten days ahead, past the default lookahead of 7d.",
            "starts_at": iso(now + 10 * DAY),
            "ends_at": iso(now + 10 * DAY + 2 * HOUR),
        },
    ]
    for event in events:
        ends_at = event["ends_at"]
        if isinstance(ends_at, str):
            ends_at = int(datetime.strptime(ends_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
        event["expires_at"] = ends_at + EXPIRES_AFTER_END
    return events


def create_table(client):
    """Create the table with the schema of `eventsync table create`, unless it exists."""
    try:
        client.create_table(
            TableName=TABLE,
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
    except client.exceptions.ResourceInUseException:
        print(f"sample data: table {TABLE} exists")
    client.get_waiter("table_exists").wait(TableName=TABLE, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    # DynamoDB rejects enabling TTL a second time, so check first.
    ttl = client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        client.update_time_to_live(
            TableName=TABLE,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
        )


def load_sample_data():
    endpoint_url = os.environ.get("SAMPLE_DATA_ENDPOINT_URL", "http://localhost:4566")
    ready_file = os.environ.get("SAMPLE_DATA_READY_FILE")
    if ready_file and os.path.exists(ready_file):
        os.remove(ready_file)

    # The endpoint and the dummy credentials are always explicit, so that this
    # script never reaches real AWS or the instance metadata service.
    session = boto3.session.Session(
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name=REGION,
    )
    client = session.client("dynamodb", endpoint_url=endpoint_url)
    create_table(client)

    table = session.resource("dynamodb", endpoint_url=endpoint_url).Table(TABLE)
    events = sample_events(int(time.time()))
    for event in events:
        table.put_item(Item=event)
    print(f"sample data: put {len(events)} events into {TABLE} at {endpoint_url}")

    if ready_file:
        with open(ready_file, "w") as marker:
            marker.write(f"{len(events)} events\n")


load_sample_data()
