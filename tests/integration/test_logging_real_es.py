"""The logging sink against a real Elasticsearch cluster, when ``ELASTICSEARCH_URL`` is set (the
project's one sanctioned skip otherwise: a cluster cannot be installed here)."""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pytest

from agents.logs import INDEX_MAPPINGS
from app.search import BulkWriter, put_index_template, search_client
from models.logs import RecordContext, document_id, index_name, index_template_patterns, parse_record


@pytest.mark.real_es
@pytest.mark.skipif(
    not os.environ.get("ELASTICSEARCH_URL"),
    reason="ELASTICSEARCH_URL not set: real-cluster test runs only against a real cluster",
)
async def test_ecs_documents_are_accepted_by_the_template_and_searchable() -> None:
    prefix = f"streamspine-test-{uuid.uuid4().hex[:8]}"
    pattern = prefix + "-{service}-{date:%Y.%m.%d}"
    template = f"{prefix}-logs"
    context = RecordContext("cart", "node-1", datetime.now(timezone.utc))
    records = [
        b'{"level": "error", "message": "payment declined", "trace_id": "t-1", "http": {"response": {"status_code": 502}}}',
        b'level=warn msg="slow query" rows=12',
        b"plain INFO line",
    ]
    actions = [
        {"_op_type": "index", "_index": index_name(pattern, doc["service"]["name"], doc["@timestamp"]),
         "_id": document_id("logs", 0, offset, line), "_source": doc}
        for offset, value in enumerate(records) for line, doc in enumerate(parse_record(value, context))
    ]
    client = search_client(os.environ["ELASTICSEARCH_URL"])
    writer = BulkWriter(client)
    try:
        await put_index_template(client, template, index_template_patterns(pattern), INDEX_MAPPINGS)
        assert await writer.write(actions) == []
        assert await writer.write(actions) == []  # redelivery overwrites
        await client.indices.refresh(index=f"{prefix}-*")
        found = await client.search(index=f"{prefix}-*", query={"term": {"log.level": "error"}})
        assert [hit["_source"]["message"] for hit in found["hits"]["hits"]] == ["payment declined"]
        assert (await client.count(index=f"{prefix}-*"))["count"] == 3
        mapping = await client.indices.get_mapping(index=f"{prefix}-*")
        properties = next(iter(mapping.body.values()))["mappings"]["properties"]
        assert properties["@timestamp"]["type"] == "date"
        assert properties["labels"]["properties"]["rows"]["type"] == "keyword"
    finally:
        await client.indices.delete(index=f"{prefix}-*", ignore_unavailable=True)
        await client.options(ignore_status=404).indices.delete_index_template(name=template)
        await writer.close()
