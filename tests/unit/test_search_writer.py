"""app/search.py: the bulk writer through the official async client, against the in-repo
Elasticsearch-compatible server (real HTTP, real client)."""
from __future__ import annotations

import asyncio

import pytest

from app.search import BULK_FILTER_PATH, BulkWriter, put_index_template, search_client
from tests.support.es_server import REJECT_FIELD, ElasticsearchTestServer


def actions(count: int, index: str = "logs-cart-2024.11.01", **extra):
    return [{"_op_type": "index", "_index": index, "_id": f"doc-{i}", "_source": {"n": i, **extra}} for i in range(count)]


async def test_writes_every_document_and_overwrites_on_redelivery():
    async with ElasticsearchTestServer() as server:
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01)
        try:
            assert await writer.write(actions(50)) == []
            assert await writer.write(actions(50)) == []  # the same ids again
        finally:
            await writer.close()
        docs = server.docs("logs-cart-2024.11.01")
        assert len(docs) == 50
        assert {doc["n"] for doc in docs.values()} == set(range(50))


async def test_whole_request_and_per_document_rejections_are_retried_until_stored():
    async with ElasticsearchTestServer() as server:
        server.fail_next(2, status=429)
        server.fail_next(1, status=503)
        server.fail_next_documents(7, status=429)
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01, max_backoff=0.05)
        try:
            assert await writer.write(actions(20)) == []
        finally:
            await writer.close()
        assert len(server.docs("logs-cart-2024.11.01")) == 20
        assert writer.retries >= 4


async def test_a_request_refused_for_its_credentials_is_waited_out_not_dead_lettered():
    """401/403 for the whole request (credentials rotated, a privilege missing) say nothing about
    the documents: they are written once an operator fixes it, none comes back as refused."""
    async with ElasticsearchTestServer() as server:
        server.fail_next(2, status=401)
        server.fail_next(1, status=403)
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01, max_backoff=0.05)
        try:
            assert await writer.write(actions(10)) == []
        finally:
            await writer.close()
        assert len(server.docs("logs-cart-2024.11.01")) == 10
        assert writer.retries == 3


async def test_a_write_to_an_index_the_cluster_may_not_create_waits_for_an_operator_to_create_it():
    async with ElasticsearchTestServer() as server:
        server.auto_create_index = False
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01, max_backoff=0.05)
        try:
            write = asyncio.ensure_future(writer.write(actions(4)))
            await asyncio.sleep(0.3)
            assert not write.done() and writer.retries > 0  # held, not refused
            await writer.client.indices.create(index="logs-cart-2024.11.01")
            assert await asyncio.wait_for(write, 10) == []
            deleted = await writer.write([{"_op_type": "delete", "_index": "logs-gone", "_id": "x"}])
        finally:
            await writer.close()
        assert len(server.docs("logs-cart-2024.11.01")) == 4
        assert deleted == []  # a delete in a missing index is done: nothing to wait for


async def test_a_whole_request_refused_is_split_until_the_refused_document_stands_alone():
    """An _id over 512 bytes makes Elasticsearch refuse the whole request (400): only that document
    comes back, with the reason; the others are stored."""
    async with ElasticsearchTestServer() as server:
        batch = actions(6)
        batch[4]["_id"] = "x" * 600
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01)
        try:
            (rejection,) = await writer.write(batch)
        finally:
            await writer.close()
        assert rejection.action is batch[4] and rejection.status == 400
        assert "action_request_validation_exception" in rejection.reason and "too long" in rejection.reason
        assert sorted(server.docs("logs-cart-2024.11.01")) == [f"doc-{i}" for i in (0, 1, 2, 3, 5)]
        assert writer.retries == 0  # a refusal, not an outage


async def test_documents_each_refused_alone_each_come_back():
    async with ElasticsearchTestServer() as server:
        server.fail_next(5, status=413)  # [0 1 2], [0], [1 2], [1], [2]
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01)
        try:
            rejections = await writer.write(actions(3))
        finally:
            await writer.close()
        assert [(r.action["_id"], r.status) for r in rejections] == [("doc-0", 413), ("doc-1", 413), ("doc-2", 413)]
        assert server.docs("logs-cart-2024.11.01") == {} and writer.retries == 0


async def test_a_document_the_client_cannot_serialize_is_refused_alone():
    async with ElasticsearchTestServer() as server:
        batch = actions(5)
        batch[2]["_source"]["tags"] = {"a set"}
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01)
        try:
            (rejection,) = await writer.write(batch)
        finally:
            await writer.close()
        assert rejection.doc_id == "doc-2" and rejection.reason.startswith("serialization_error")
        assert sorted(server.docs("logs-cart-2024.11.01")) == ["doc-0", "doc-1", "doc-3", "doc-4"]


async def test_a_delete_of_what_is_already_gone_is_done():
    async with ElasticsearchTestServer() as server:
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01)
        try:
            assert await writer.write(actions(1)) == []
            gone = [{"_op_type": "delete", "_index": "logs-cart-2024.11.01", "_id": "never-written"},
                    {"_op_type": "delete", "_index": "no-such-index", "_id": "x"}]
            assert await writer.write(gone) == []
        finally:
            await writer.close()
        assert writer.retries == 0


async def test_an_unavailable_cluster_is_waited_for():
    async with ElasticsearchTestServer() as server:
        server.set_unavailable(True)
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01, max_backoff=0.05)
        try:
            write = asyncio.ensure_future(writer.write(actions(5)))
            await asyncio.sleep(0.5)
            assert not write.done() and writer.retries > 0  # still waiting, nothing dropped
            server.set_unavailable(False)
            assert await asyncio.wait_for(write, 10) == []
        finally:
            await writer.close()
        assert len(server.docs("logs-cart-2024.11.01")) == 5


async def test_a_refused_document_is_returned_with_the_reason_and_the_rest_is_stored():
    async with ElasticsearchTestServer() as server:
        batch = actions(3)
        batch[1]["_source"][REJECT_FIELD] = "field [n] of different type"
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01)
        try:
            (rejection,) = await writer.write(batch)
        finally:
            await writer.close()
        assert rejection.action["_id"] == "doc-1"
        assert rejection.status == 400
        assert "mapper_parsing_exception" in rejection.reason and "different type" in rejection.reason
        assert sorted(server.docs("logs-cart-2024.11.01")) == ["doc-0", "doc-2"]


def pairs(count: int, index: str = "logs-cart-2024.11.01"):
    """The same documents as ``actions`` in the form the helpers put on the wire."""
    return [({"index": {"_index": index, "_id": f"doc-{i}"}}, {"n": i}) for i in range(count)]


async def test_header_document_pairs_are_written_retried_and_refused_like_dict_actions():
    async with ElasticsearchTestServer() as server:
        batch = pairs(30)
        batch[4][1][REJECT_FIELD] = "field [n] of different type"
        server.fail_next(1, status=503)
        server.fail_next_documents(5, status=429)
        writer = BulkWriter(search_client(server.url), initial_backoff=0.01, max_backoff=0.05)
        try:
            (rejection,) = await writer.write(batch)
        finally:
            await writer.close()
        assert rejection.doc_id == "doc-4" and rejection.status == 400
        assert sorted(server.docs("logs-cart-2024.11.01"), key=lambda i: int(i[4:])) == [f"doc-{i}" for i in range(30) if i != 4]


async def test_the_writer_asks_for_bulk_answers_with_only_what_it_reads():
    async with ElasticsearchTestServer() as server:
        writer = BulkWriter(search_client(server.url))
        try:
            assert await writer.write(pairs(3)) == []
            answer = await writer.client.bulk(operations=[{"index": {"_index": "a", "_id": "1"}}, {"n": 1}],
                                              filter_path=BULK_FILTER_PATH)
        finally:
            await writer.close()
        assert [query.get("filter_path") for query in server.bulk_queries] == [BULK_FILTER_PATH] * 2
        assert answer.body == {"errors": False, "items": [{"index": {"_index": "a", "_id": "1", "status": 201}}]}


async def test_index_template_is_stored():
    async with ElasticsearchTestServer() as server:
        client = search_client(server.url)
        try:
            await put_index_template(client, "streamspine-logs", ["logs-*"], {"properties": {"@timestamp": {"type": "date"}}})
        finally:
            await client.close()
        assert server.templates["streamspine-logs"]["index_patterns"] == ["logs-*"]


def test_the_document_serializer_writes_what_the_client_would_and_refuses_the_same():
    from datetime import datetime, timezone

    from elastic_transport import OrjsonSerializer, SerializationError

    from app.search import DocumentSerializer

    fast, stock = DocumentSerializer(), OrjsonSerializer()
    for value in ({"a": {"b": [1, 2.5, None]}, "t": datetime(2024, 11, 1, tzinfo=timezone.utc)}, "{}", b"{}", [1]):
        assert fast.dumps(value) == stock.dumps(value)
    for broken in ({"a": object()}, [object()]):
        with pytest.raises(SerializationError):
            fast.dumps(broken)
