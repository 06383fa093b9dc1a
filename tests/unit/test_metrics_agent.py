"""The metrics agent under Faust's test_context: records in, table state out."""
from __future__ import annotations

import asyncio
import json

from agents.metrics import record_samples
from tables.metrics import latest_samples


T0 = 1732412300.0


async def batch_written(read, timeout: float = 5.0):
    """The agent writes once per batch (every BATCH_WITHIN seconds at most): wait for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not read() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return read()


def sample(**fields) -> bytes:
    return json.dumps({"metric": "cpu", "instance": "cart-1", **fields}).encode()


async def test_samples_update_the_latest_values_of_their_service():
    async with record_samples.test_context() as agent:
        await agent.put(sample(value=0.5, ts=T0 + 10), key=b"cart")
        await agent.put(json.dumps([{"metric": "memory", "value": 0.7, "ts": T0 + 11}, {"metric": "cpu", "instance": "cart-1", "value": 0.6, "ts": T0 + 12}]).encode(), key=b"cart")

        state = await batch_written(lambda: latest_samples["cart"])

    assert state["samples"] == 3
    assert state["metrics"]["cpu"] == {"cart-1": {"value": 0.6, "ts": T0 + 12}}
    assert state["metrics"]["memory"] == {"cart": {"value": 0.7, "ts": T0 + 11}}


def test_table_keys_are_the_raw_topic_keys_so_table_routes_find_the_owner():
    # A str key would be JSON-encoded ('"cart"') and hash to another partition than the
    # source record's key b"cart": @app.table_route would then ask the wrong worker.
    assert latest_samples.changelog_topic.prepare_key("cart", None)[0] == b"cart"
