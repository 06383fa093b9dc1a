"""Drive the real ``elasticsearch`` client against the in-process test server.

``test_real_cluster_roundtrip`` runs the same roundtrip against a real cluster
when ``ELASTICSEARCH_URL`` is set (the project's one sanctioned skip otherwise).
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    BadRequestError,
    ConflictError,
    Elasticsearch,
    NotFoundError,
)
from elasticsearch.helpers import BulkIndexError, async_bulk, async_streaming_bulk

from tests.support.es_server import ElasticsearchTestServer

LOGS = [
    {"_id": "1", "service": {"name": "api"}, "level": "error", "latency_ms": 120, "msg": "Timeout talking to db"},
    {"_id": "2", "service": {"name": "api"}, "level": "info", "latency_ms": 15, "msg": "request ok"},
    {"_id": "3", "service.name": "worker", "level": "error", "latency_ms": 300, "msg": "job failed"},
    {"_id": "4", "service.name": "api", "level": "warn", "latency_ms": 80, "msg": "slow request"},
]


@pytest.fixture
async def es_server() -> AsyncIterator[ElasticsearchTestServer]:
    async with ElasticsearchTestServer() as server:
        yield server


@pytest.fixture
async def es(es_server: ElasticsearchTestServer) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(es_server.url)
    yield client
    await client.close()


def _actions(index: str) -> list[dict[str, Any]]:
    return [{"_index": index, **doc} for doc in LOGS]


async def _roundtrip(es: AsyncElasticsearch, index: str) -> None:
    """Index, refresh, count and search; shared by the fake and real-cluster tests."""
    ok, errors = await async_bulk(es, _actions(index), refresh="wait_for")
    assert (ok, errors) == (4, [])
    await es.indices.refresh(index=index)
    assert (await es.count(index=index))["count"] == 4
    resp = await es.search(
        index=index,
        query={"bool": {"filter": [{"term": {"level": "error"}}, {"range": {"latency_ms": {"gte": 100}}}]}},
        sort=[{"latency_ms": {"order": "desc"}}],
    )
    assert resp["hits"]["total"]["value"] == 2
    assert [h["_id"] for h in resp["hits"]["hits"]] == ["3", "1"]
    doc = await es.get(index=index, id="1")
    assert doc["found"] and doc["_source"]["service"]["name"] == "api"


async def test_info_and_ping(es: AsyncElasticsearch) -> None:
    assert await es.ping()
    info = await es.info()
    assert info["version"]["number"] == "8.15.0"
    assert info["tagline"] == "You Know, for Search"
    assert info.meta.headers["X-Elastic-Product"] == "Elasticsearch"


async def test_create_index_and_exists(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    assert not await es.indices.exists(index="logs-a")
    await es.indices.create(index="logs-a", mappings={"properties": {"level": {"type": "keyword"}}})
    assert await es.indices.exists(index="logs-a")
    with pytest.raises(BadRequestError) as exc:
        await es.indices.create(index="logs-a")
    assert exc.value.error == "resource_already_exists_exception"
    await es.indices.delete(index="logs-a")
    assert not await es.indices.exists(index="logs-a")
    assert ("HEAD", "/logs-a") in es_server.requests


async def test_index_template_stored(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    await es.indices.put_index_template(name="logs", index_patterns=["logs-*"], priority=10)
    got = await es.indices.get_index_template(name="logs")
    assert got["index_templates"][0]["index_template"]["index_patterns"] == ["logs-*"]
    assert es_server.templates["logs"]["priority"] == 10
    with pytest.raises(NotFoundError):
        await es.indices.get_index_template(name="missing")


async def test_roundtrip_against_test_server(es: AsyncElasticsearch) -> None:
    await _roundtrip(es, "logs-roundtrip")


async def test_bulk_then_search_queries(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    await async_bulk(es, _actions("logs-2024"))
    await es.index(index="logs-2025", id="9", document={"service": {"name": "api"}, "level": "debug"})
    await es.indices.refresh()
    assert set(es_server.indices) == {"logs-2024", "logs-2025"}  # auto-created

    async def ids(index: str = "logs-*", **kw: Any) -> list[str]:
        resp = await es.search(index=index, **kw)
        return [h["_id"] for h in resp["hits"]["hits"]]

    # dotted path resolves nested objects and flat dotted keys alike; wildcard + comma lists
    assert sorted(await ids(query={"term": {"service.name": "api"}})) == ["1", "2", "4", "9"]
    assert sorted(await ids("logs-2024,logs-2025", query={"term": {"service.name.keyword": "worker"}})) == ["3"]
    assert sorted(await ids(query={"terms": {"level": ["warn", "debug"]}})) == ["4", "9"]
    assert await ids(query={"match": {"msg": "timeout"}}) == ["1"]
    assert await ids(query={"range": {"latency_ms": {"gt": 15, "lt": 300}}}, sort="latency_ms") == ["4", "1"]
    assert await ids(query={"match_all": {}}, sort=[{"latency_ms": "asc"}], size=2, from_=2) == ["1", "3"]
    assert await ids(sort=[{"latency_ms": {"order": "desc"}}]) == ["3", "1", "4", "2", "9"]  # missing last
    resp = await es.search(index="logs-2024", query={"bool": {"must": [{"term": {"level": "error"}}],
                                                              "must_not": [{"term": {"service.name": "worker"}}]}})
    assert resp["hits"]["total"]["value"] == 1
    assert (await es.count(index="logs-*", query={"term": {"service.name": "api"}}))["count"] == 4
    with pytest.raises(NotFoundError):
        await es.search(index="nope", query={"match_all": {}})


async def test_get_and_delete_document(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    resp = await es.index(index="docs", id="a", document={"x": 1}, refresh=True)
    assert resp["result"] == "created" and resp["_version"] == 1
    assert (await es.index(index="docs", id="a", document={"x": 2}))["_version"] == 2
    got = await es.get(index="docs", id="a")
    assert got["_source"] == {"x": 2}
    with pytest.raises(NotFoundError) as exc:
        await es.get(index="docs", id="missing")
    assert exc.value.body["found"] is False
    assert (await es.delete(index="docs", id="a"))["result"] == "deleted"
    assert es_server.indices["docs"] == {}
    with pytest.raises(NotFoundError):
        await es.delete(index="docs", id="a")


async def test_create_and_update(es: AsyncElasticsearch) -> None:
    await es.create(index="docs", id="c", document={"a": {"b": 1}})
    with pytest.raises(ConflictError):
        await es.create(index="docs", id="c", document={"a": {"b": 2}})
    await es.update(index="docs", id="c", doc={"a": {"c": 3}})
    await es.update(index="docs", id="new", doc={"z": 1}, doc_as_upsert=True)
    assert (await es.get(index="docs", id="c"))["_source"] == {"a": {"b": 1, "c": 3}}
    assert (await es.get(index="docs", id="new"))["_source"] == {"z": 1}


async def test_external_versioning_via_bulk(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    def action(version: int, value: str) -> dict[str, Any]:
        return {"_index": "cdc", "_id": "k", "_version": version, "_version_type": "external", "v": value}

    assert await async_bulk(es, [action(5, "five")]) == (1, [])
    ok, errors = await async_bulk(es, [action(3, "stale"), action(5, "same")], raise_on_error=False)
    assert ok == 0 and len(errors) == 2
    assert {e["index"]["status"] for e in errors} == {409}
    assert errors[0]["index"]["error"]["type"] == "version_conflict_engine_exception"
    assert await async_bulk(es, [action(7, "seven")]) == (1, [])
    assert es_server.indices["cdc"]["k"] == {"_source": {"v": "seven"}, "_version": 7, "_seq_no": 1}
    # external_gte accepts an equal version; deletes keep their version as a tombstone
    gte = {**action(7, "again"), "_version_type": "external_gte"}
    assert await async_bulk(es, [gte]) == (1, [])
    await async_bulk(es, [{"_op_type": "delete", "_index": "cdc", "_id": "k",
                           "_version": 9, "_version_type": "external"}])
    _, errors = await async_bulk(es, [action(8, "after-delete")], raise_on_error=False)
    assert errors and errors[0]["index"]["status"] == 409


async def test_external_versioning_via_index(es: AsyncElasticsearch) -> None:
    await es.index(index="cdc", id="k", document={"v": 1}, version=10, version_type="external")
    with pytest.raises(ConflictError) as exc:
        await es.index(index="cdc", id="k", document={"v": 0}, version=9, version_type="external")
    assert exc.value.error == "version_conflict_engine_exception"
    resp = await es.index(index="cdc", id="k", document={"v": 2}, version=11, version_type="external")
    assert resp["_version"] == 11 and resp["result"] == "updated"


async def test_bulk_429_is_retried_by_helper(es_server: ElasticsearchTestServer) -> None:
    # Transport-level retries off, so the retries observed are the helper's own.
    async with AsyncElasticsearch(es_server.url, max_retries=0) as es:
        es_server.fail_next(2)
        results = [r async for r in async_streaming_bulk(
            es, _actions("retry"), max_retries=3, initial_backoff=0.01)]
        assert all(ok for ok, _ in results) and len(results) == 4
        assert [p for m, p in es_server.requests if p.endswith("_bulk")] == ["/_bulk"] * 3
        assert len(es_server.indices["retry"]) == 4

        es_server.fail_next(5)
        with pytest.raises(ApiError) as exc:
            async for _ in async_streaming_bulk(es, _actions("retry"), max_retries=2, initial_backoff=0.01):
                pass
        assert exc.value.status_code == 429 and exc.value.error == "es_rejected_execution_exception"


async def test_per_item_rejection(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    docs = [{"_index": "rej", "_id": "good", "x": 1},
            {"_index": "rej", "_id": "bad", "x": 2, "__reject__": "failed to parse field [x]"}]
    ok, errors = await async_bulk(es, docs, raise_on_error=False)
    assert ok == 1
    (error,) = errors
    assert error["index"]["_id"] == "bad" and error["index"]["status"] == 400
    assert error["index"]["error"] == {"type": "mapper_parsing_exception", "reason": "failed to parse field [x]",
                                       "index": "rej", "index_uuid": "_na_", "shard": "0"}
    assert set(es_server.indices["rej"]) == {"good"}
    with pytest.raises(BulkIndexError):
        await async_bulk(es, docs[1:])


async def test_unavailable_cluster(es: AsyncElasticsearch, es_server: ElasticsearchTestServer) -> None:
    es_server.set_unavailable(True)
    assert not await es.options(max_retries=0).ping()
    with pytest.raises(ApiError) as exc:
        await es.options(max_retries=0).info()
    assert exc.value.status_code == 503
    es_server.set_unavailable(False)
    assert await es.ping()


def test_threaded_server_for_sync_callers() -> None:
    with ElasticsearchTestServer.in_thread() as server:
        with urllib.request.urlopen(server.url) as resp:
            assert resp.headers["X-Elastic-Product"] == "Elasticsearch"
            assert resp.headers["Content-Type"] == "application/json"
            assert json.load(resp)["version"]["number"] == "8.15.0"
        with Elasticsearch(server.url) as es:
            es.index(index="sync", id="1", document={"a": 1})
            assert es.count(index="sync")["count"] == 1
        assert server.docs("sync") == {"1": {"a": 1}}


@pytest.mark.real_es
@pytest.mark.skipif(
    not os.environ.get("ELASTICSEARCH_URL"),
    reason="ELASTICSEARCH_URL not set: real-cluster test runs only against a real cluster",
)
async def test_real_cluster_roundtrip() -> None:
    index = f"streamspine-test-{uuid.uuid4().hex[:12]}"
    async with AsyncElasticsearch(os.environ["ELASTICSEARCH_URL"]) as es:
        try:
            await _roundtrip(es, index)
        finally:
            await es.indices.delete(index=index, ignore_unavailable=True)
