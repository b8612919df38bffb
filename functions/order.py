"""Kafka example: handle one record of the "orders" topic.

Wire it to a topic in eventrun.toml (compose/eventrun.toml does):

    [functions.orders]
    handler = "functions/order.py:main_handler"

    [[functions.orders.triggers]]
    type = "kafka"
    topic = "orders"
    group_id = "eventrun-orders"
    starting_position = "earliest"

A record with key `order-42` and value `{"order_id": 42, "amount": 19.5}` returns
{"order": {"order_id": 42, "amount": 19.5}, "key": "order-42", "partition": 0, "offset": 7}.
"""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Log the order a record carries and return it with where it came from."""
    # event["data"] holds the record: key (or key_base64 when the key is not UTF-8), value (the
    # decoded JSON value, or value_base64 when the value is not JSON), headers, partition,
    # offset and timestamp (ms).
    data = event["data"]
    where = f"{event['source']} partition {data['partition']} offset {data['offset']}"
    if "value" not in data:
        context.logger.warning("record at %s is not JSON; nothing to do", where)
        return {"skipped": where}
    order = data["value"]
    key = data.get("key")  # (None without a key, or for a key that is not UTF-8)
    context.logger.info("order %s (key %s) from %s", order, key, where)
    return {"order": order, "key": key, "partition": data["partition"], "offset": data["offset"]}
