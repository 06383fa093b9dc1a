"""In-process Elasticsearch-compatible HTTP server for tests.

Elasticsearch cannot run in the test environment, so this module serves the
small subset of the REST API that the official ``elasticsearch`` client
(``AsyncElasticsearch``, ``helpers.async_bulk``/``async_streaming_bulk``) uses.
Tests therefore exercise the real client's wire path: serialization, the
``X-Elastic-Product`` check, retries and error mapping.

Supported: cluster info/ping, index create/exists/delete, index templates
(stored, not applied), ``_bulk`` (index/create/update/delete with external
versioning), single-document CRUD, ``_search``/``_count`` (match_all, term,
terms, match, ids, exists, range, bool), ``_refresh``, and ``filter_path`` on
successful answers (include patterns, ``*`` within a key; no ``**`` or ``-`` exclusions).  Writes are visible
immediately; ``_refresh`` is accepted but is a no-op.

Fault injection: :meth:`ElasticsearchTestServer.fail_next` (reject the next
``_bulk`` requests, 429 by default), :meth:`fail_next_documents` (reject the
next documents inside ``_bulk`` requests), :meth:`set_unavailable` (503 for every
request), and any document with a top-level (or ``labels.``) ``"__reject__": "<reason>"``
field is rejected per item with 400 ``mapper_parsing_exception``. With ``auto_create_index``
set to False, a write to a missing index is refused per item with 404 ``index_not_found_exception``.
As Elasticsearch does, a ``_bulk`` request with an ``_id`` over 512 bytes is refused whole (400).

Usage::

    async with ElasticsearchTestServer() as server:
        client = AsyncElasticsearch(server.url)

    with ElasticsearchTestServer.in_thread() as server:  # sync / subprocess use
        os.environ["ELASTICSEARCH_URL"] = server.url
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import json
import threading
import uuid
from typing import Any, Awaitable, Callable, Iterator

import orjson
from aiohttp import web

__all__ = ["ElasticsearchTestServer", "REJECT_FIELD"]

REJECT_FIELD = "__reject__"
MAX_ID_BYTES = 512
BULK_ACTIONS = ("index", "create", "update", "delete")
VERSION = "8.15.0"
COMPAT_JSON = "application/vnd.elasticsearch+json;compatible-with=8"
SHARDS = {"total": 1, "successful": 1, "failed": 0}
_MISSING = object()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EsError(Exception):
    """An Elasticsearch error: HTTP status, error type and reason."""

    def __init__(self, status: int, type_: str, reason: str, index: str | None = None):
        super().__init__(reason)
        self.status, self.type, self.reason, self.index = status, type_, reason, index

    def cause(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "reason": self.reason}
        if self.index is not None:
            err.update(index=self.index, index_uuid="_na_", shard="0")
        return err

    def body(self) -> dict[str, Any]:
        return {"error": {"root_cause": [self.cause()], **self.cause()}, "status": self.status}


def rejection_of(doc: Any) -> str | None:
    """The injected refusal of a document: a top-level ``__reject__`` field, or one under
    ``labels`` (where an ECS-normalizing client puts unknown fields)."""
    if not isinstance(doc, dict):
        return None
    labels = doc.get("labels")
    reason = doc.get(REJECT_FIELD, labels.get(REJECT_FIELD) if isinstance(labels, dict) else None)
    return None if reason is None else str(reason)


# --------------------------------------------------------------- filter_path
def filter_response(body: Any, filter_path: str) -> Any:
    """Elasticsearch's ``filter_path``: keep only the dotted paths named (``*`` matches within one
    key, arrays are looked through, objects left empty are dropped)."""
    kept = _filter(body, _path_tree(filter_path))
    return {} if kept is _MISSING else kept


class PathTree:
    """Key patterns of one level of a ``filter_path`` -> the tree below, or True (keep it all);
    what each key matches is remembered, as answers repeat the same keys."""

    __slots__ = ("patterns", "matched", "_leaves")

    def __init__(self) -> None:
        self.patterns: dict[str, PathTree | bool] = {}
        self.matched: dict[str, PathTree | bool | None] = {}
        self._leaves: frozenset[str] | None | bool = False  # False: not worked out yet

    @property
    def leaves(self) -> frozenset[str] | None:
        """The names kept, when this level keeps whole values of plain names only (a bulk item's
        ``_id``, ``status``, ...): then an object is filtered with one comprehension."""
        if self._leaves is False:
            plain = all(sub is True and "*" not in name for name, sub in self.patterns.items())
            self._leaves = frozenset(self.patterns) if plain else None
        return self._leaves  # type: ignore[return-value]

    def below(self, key: str) -> PathTree | bool | None:
        if key not in self.matched:
            self.matched[key] = self._match(key)
        return self.matched[key]

    def _match(self, key: str) -> PathTree | bool | None:
        matches = [sub for pattern, sub in self.patterns.items()
                   if pattern == key or ("*" in pattern and fnmatch.fnmatchcase(key, pattern))]
        if not matches or any(sub is True for sub in matches):
            return True if matches else None
        if len(matches) == 1:
            return matches[0]
        merged = PathTree()
        for sub in matches:
            merged.patterns.update(sub.patterns)  # type: ignore[union-attr]
        return merged


@functools.lru_cache(maxsize=64)
def _path_tree(filter_path: str) -> PathTree:
    tree = PathTree()
    for path in filter_path.split(","):
        parts = [part.strip() for part in path.split(".") if part.strip()]
        node = tree
        for i, part in enumerate(parts):
            if i == len(parts) - 1:
                node.patterns[part] = True
                break
            child = node.patterns.get(part)
            if child is True:
                break  # a shorter path keeps the whole value already
            if child is None:
                child = node.patterns[part] = PathTree()
            node = child
    return tree


def _filter(value: Any, tree: PathTree) -> Any:
    if isinstance(value, list):
        kept = [item for item in (_filter(v, tree) for v in value) if item is not _MISSING]
        return kept or _MISSING
    if not isinstance(value, dict):
        return _MISSING
    leaves = tree.leaves
    if leaves is not None:
        kept = {key: inner for key, inner in value.items() if key in leaves}
        return kept or _MISSING
    out: dict[str, Any] = {}
    for key, inner in value.items():
        sub = tree.below(key)
        if sub is True:
            out[key] = inner
        elif sub is not None:
            kept = _filter(inner, sub)
            if kept is not _MISSING:
                out[key] = kept
    return out or _MISSING


# --------------------------------------------------------------------- query
def lookup(obj: Any, parts: list[str]) -> list[Any]:
    """Values at a dotted path; handles nested objects, flat dotted keys and arrays."""
    if not parts:
        return [v for item in obj for v in lookup(item, [])] if isinstance(obj, list) else [obj]
    if isinstance(obj, list):
        return [v for item in obj for v in lookup(item, parts)]
    if not isinstance(obj, dict):
        return []
    for i in range(len(parts), 0, -1):  # longest flat key first: {"a.b": 1} or {"a": {"b": 1}}
        key = ".".join(parts[:i])
        if key in obj:
            found = lookup(obj[key], parts[i:])
            if found:
                return found
    return []


def field_values(doc_id: str, source: dict[str, Any], field: str) -> list[Any]:
    if field == "_id":
        return [doc_id]
    values = lookup(source, field.split("."))
    if not values and field.endswith(".keyword"):
        values = lookup(source, field[: -len(".keyword")].split("."))
    return [v for v in values if v is not None]


def _unwrap(spec: Any, key: str) -> tuple[str, Any]:
    """Split ``{"field": value}`` / ``{"field": {key: value, ...}}``."""
    (field, value), = ((k, v) for k, v in spec.items() if k != "boost")
    return field, value[key] if isinstance(value, dict) else value


def _match_text(value: Any, query: Any) -> bool:
    if isinstance(value, str) and isinstance(query, str):
        return query.lower() in value.lower()
    return value == query


def matches(query: dict[str, Any] | None, doc_id: str, source: dict[str, Any]) -> bool:
    """Evaluate the supported query DSL subset against one document."""
    if not query:
        return True
    (kind, spec), = query.items()
    vals = lambda field: field_values(doc_id, source, field)  # noqa: E731
    if kind == "match_all":
        return True
    if kind == "match_none":
        return False
    if kind == "term":
        field, value = _unwrap(spec, "value")
        return value in vals(field)
    if kind == "terms":
        field, wanted = _unwrap(spec, "")
        return any(v in wanted for v in vals(field))
    if kind in ("match", "match_phrase"):
        field, text = _unwrap(spec, "query")
        return any(_match_text(v, text) for v in vals(field))
    if kind == "ids":
        return doc_id in spec.get("values", [])
    if kind == "exists":
        return bool(vals(spec["field"]))
    if kind == "range":
        field, bounds = next((k, v) for k, v in spec.items())
        return any(_in_range(v, bounds) for v in vals(field))
    if kind == "bool":
        return _match_bool(spec, doc_id, source)
    raise EsError(400, "parsing_exception", f"unknown query [{kind}] (not supported by test server)")


def _in_range(value: Any, bounds: dict[str, Any]) -> bool:
    try:
        return all(
            {"gt": value > b, "gte": value >= b, "lt": value < b, "lte": value <= b}[op]
            for op, b in bounds.items()
            if op in ("gt", "gte", "lt", "lte")
        )
    except TypeError:
        return False


def _match_bool(spec: dict[str, Any], doc_id: str, source: dict[str, Any]) -> bool:
    clauses = {k: v if isinstance(v, list) else [v] for k, v in spec.items() if k != "boost"}
    test = lambda key: [matches(q, doc_id, source) for q in clauses.get(key, [])]  # noqa: E731
    if not all(test("must") + test("filter")) or any(test("must_not")):
        return False
    should = test("should")
    default_min = 0 if ("must" in clauses or "filter" in clauses) else 1
    wanted = str(spec.get("minimum_should_match", default_min))
    return sum(should) >= min(int(wanted) if wanted.isdigit() else default_min, len(should))


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def _sort_specs(sort: Any) -> list[tuple[str, bool]]:
    """Normalize ES sort syntax to ``[(field, descending)]``."""
    specs = []
    for item in sort if isinstance(sort, list) else [sort]:
        if isinstance(item, str):
            field, _, order = item.partition(":")
            specs.append((field, order == "desc" or (field == "_score" and not order)))
        else:
            (field, opts), = item.items()
            order = opts.get("order", "asc") if isinstance(opts, dict) else opts
            specs.append((field, order == "desc"))
    return specs


# -------------------------------------------------------------------- server
class ElasticsearchTestServer:
    """Fake Elasticsearch 8 node on ``127.0.0.1:<free port>``.

    Introspection: ``indices`` (index -> id -> ``{"_source", "_version", "_seq_no"}``),
    ``templates`` (name -> body), ``requests`` (list of ``(method, path)``).
    """

    def __init__(self) -> None:
        self.indices: dict[str, dict[str, dict[str, Any]]] = {}
        self.index_meta: dict[str, dict[str, Any]] = {}  # settings/mappings, tombstones, seq_no
        self.templates: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.bulk_queries: list[dict[str, str]] = []  # the query string of each _bulk request
        self._fail_bulk: list[int] = []
        self._fail_items: list[int] = []
        self.on_write: Callable[[str, str, dict[str, Any]], None] | None = None  # (index, id, doc), benchmarks
        self._unavailable = False
        self.auto_create_index = True  # False: a write to a missing index is refused (404), as action.auto_create_index=false does
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> ElasticsearchTestServer:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024**2)
        self._add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ElasticsearchTestServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def run_in_thread(self, timeout: float = 10.0) -> ElasticsearchTestServer:
        """Start the server on its own event loop in a daemon thread (for sync code)."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="es-test-server", daemon=True)
        self._thread.start()
        self._thread_loop = loop
        asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        loop, thread = self._thread_loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
        self._thread_loop = self._thread = None

    @classmethod
    @contextlib.contextmanager
    def in_thread(cls) -> Iterator[ElasticsearchTestServer]:
        server = cls().run_in_thread()
        try:
            yield server
        finally:
            server.stop_thread()

    # -- fault injection / test helpers -------------------------------------
    def fail_next(self, n: int, status: int = 429) -> None:
        """Answer the next ``n`` ``_bulk`` requests with ``status``."""
        self._fail_bulk.extend([status] * n)

    def fail_next_documents(self, n: int, status: int = 429) -> None:
        """Answer the next ``n`` documents of ``_bulk`` requests with a per-item ``status``."""
        self._fail_items.extend([status] * n)

    def set_unavailable(self, unavailable: bool = True) -> None:
        """While set, every request is answered with 503."""
        self._unavailable = unavailable

    def reset(self) -> None:
        """Drop all data, templates, recorded requests and pending faults."""
        for coll in (self.indices, self.index_meta, self.templates):
            coll.clear()
        self.requests.clear()
        self.bulk_queries.clear()
        self._fail_bulk.clear()
        self._fail_items.clear()
        self._unavailable = False
        self.auto_create_index = True

    def docs(self, index: str) -> dict[str, Any]:
        """``{id: _source}`` of one index (convenience for assertions)."""
        return {i: d["_source"] for i, d in self.indices.get(index, {}).items()}

    # -- HTTP plumbing ------------------------------------------------------
    def _add_routes(self, r: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/", self._info), ("HEAD", "/", self._info),
            ("*", "/_bulk", self._bulk), ("*", "/_search", self._search),
            ("*", "/_count", self._count), ("*", "/_refresh", self._refresh),
            ("*", "/_index_template/{name}", self._template),
            ("*", "/{index}/_bulk", self._bulk), ("*", "/{index}/_search", self._search),
            ("*", "/{index}/_count", self._count), ("*", "/{index}/_refresh", self._refresh),
            ("POST", "/{index}/_doc", self._doc),
            ("*", "/{index}/_doc/{id}", self._doc), ("*", "/{index}/_create/{id}", self._doc),
            ("POST", "/{index}/_update/{id}", self._update),
            ("*", "/{index}", self._index),
        ]
        for method, path, handler in routes:
            r.add_route(method, path, handler)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        try:
            if self._unavailable:
                raise EsError(503, "master_not_discovered_exception", "cluster unavailable (test server)")
            return await handler(request)
        except EsError as exc:
            return self._reply(request, exc.status, exc.body())
        except web.HTTPException as exc:
            return self._reply(request, exc.status, EsError(exc.status, "http_exception", exc.reason).body())

    @staticmethod
    def _reply(request: web.Request, status: int, body: Any = None) -> web.Response:
        accept = request.headers.get("Accept", "")
        ctype = COMPAT_JSON if "vnd.elasticsearch" in accept else "application/json"
        if body is not None and status < 400 and "filter_path" in request.query:
            body = filter_response(body, request.query["filter_path"])
        data = b"" if body is None or request.method == "HEAD" else orjson.dumps(body)
        headers = {"Content-Type": ctype, "X-Elastic-Product": "Elasticsearch"}
        return web.Response(status=status, body=data, headers=headers)

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise EsError(400, "parse_exception", f"request body is not valid JSON: {exc}") from exc

    # -- storage -------------------------------------------------------------
    def _create_index(self, name: str, body: dict[str, Any] | None = None) -> None:
        if name.startswith(("_", "-", "+")) or name != name.lower() or "*" in name:
            raise EsError(400, "invalid_index_name_exception", f"Invalid index name [{name}]", name)
        self.indices[name] = {}
        self.index_meta[name] = {"body": body or {}, "tombstones": {}, "seq_no": 0}

    def _resolve(self, expr: str | None, strict: bool = True) -> list[str]:
        """Expand a comma list / wildcard index expression to existing indices."""
        if expr in (None, "", "_all", "*"):
            return sorted(self.indices)
        names: list[str] = []
        for part in expr.split(","):
            if any(c in part for c in "*?"):
                names += [n for n in sorted(self.indices) if fnmatch.fnmatchcase(n, part)]
            elif part in self.indices:
                names.append(part)
            elif strict:
                raise EsError(404, "index_not_found_exception", f"no such index [{part}]", part)
        return list(dict.fromkeys(names))

    def _write(self, action: str, index: str, doc_id: str | None, body: Any,
               meta: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Apply one index/create/update/delete; returns (status, result) or raises EsError."""
        if index not in self.indices:
            if action == "delete" or not self.auto_create_index:
                raise EsError(404, "index_not_found_exception", f"no such index [{index}]", index)
            self._create_index(index)
        docs, info = self.indices[index], self.index_meta[index]
        doc_id = doc_id or uuid.uuid4().hex[:20]
        checked = (body or {}).get("doc") if action == "update" else body
        reject = rejection_of(checked)
        if reject is not None:
            raise EsError(400, "mapper_parsing_exception", reject, index)
        if self.on_write is not None and isinstance(checked, dict):
            self.on_write(index, doc_id, checked)
        existing = docs.get(doc_id)
        current = existing["_version"] if existing else info["tombstones"].get(doc_id)
        self._check_version(doc_id, existing, current, meta, action, index)

        if action == "delete":
            if existing is None:
                return 404, self._result(index, doc_id, current or 1, "not_found", info)
            del docs[doc_id]
            version = self._next_version(current, meta)
            info["tombstones"][doc_id] = version
            return 200, self._result(index, doc_id, version, "deleted", info)
        if action == "update":
            body = body or {}
            if existing is None:
                if body.get("doc_as_upsert") and "doc" in body:
                    source = body["doc"]
                elif "upsert" in body:
                    source = body["upsert"]
                else:
                    raise EsError(404, "document_missing_exception", f"[{doc_id}]: document missing", index)
            else:
                source = _deep_merge(existing["_source"], body.get("doc", {}))
                if source == existing["_source"]:
                    return 200, self._result(index, doc_id, current, "noop", info, bump=False)
            meta = {}
        else:
            source = body
        version = self._next_version(current, meta)
        docs[doc_id] = {"_source": source, "_version": version, "_seq_no": info["seq_no"]}
        info["tombstones"].pop(doc_id, None)
        result = "updated" if existing else "created"
        return (200 if existing else 201), self._result(index, doc_id, version, result, info)

    @staticmethod
    def _check_version(doc_id: str, existing: dict[str, Any] | None, current: int | None,
                       meta: dict[str, Any], action: str, index: str) -> None:
        if action == "create" and existing is not None:
            raise EsError(409, "version_conflict_engine_exception",
                          f"[{doc_id}]: version conflict, document already exists "
                          f"(current version [{current}])", index)
        if "if_seq_no" in meta and (existing is None or existing["_seq_no"] != int(meta["if_seq_no"])):
            raise EsError(409, "version_conflict_engine_exception",
                          f"[{doc_id}]: version conflict, required seqNo [{meta['if_seq_no']}]", index)
        vtype, version = meta.get("version_type"), meta.get("version")
        if version is None or vtype not in ("external", "external_gte") or current is None:
            return
        version = int(version)
        if (version > current) if vtype == "external" else (version >= current):
            return
        relation = "higher or equal to" if vtype == "external" else "higher than"
        raise EsError(409, "version_conflict_engine_exception",
                      f"[{doc_id}]: version conflict, current version [{current}] is {relation} "
                      f"the one provided [{version}]", index)

    @staticmethod
    def _next_version(current: int | None, meta: dict[str, Any]) -> int:
        if meta.get("version_type") in ("external", "external_gte") and meta.get("version") is not None:
            return int(meta["version"])
        return (current or 0) + 1

    @staticmethod
    def _result(index: str, doc_id: str, version: int | None, result: str,
                info: dict[str, Any], bump: bool = True) -> dict[str, Any]:
        if bump:
            info["seq_no"] += 1
        return {"_index": index, "_id": doc_id, "_version": version, "result": result,
                "_shards": SHARDS, "_seq_no": info["seq_no"] - 1 if bump else info["seq_no"],
                "_primary_term": 1}

    # -- handlers ------------------------------------------------------------
    async def _info(self, request: web.Request) -> web.Response:
        return self._reply(request, 200, {
            "name": "es-test-server", "cluster_name": "streamspine-test", "cluster_uuid": "test",
            "version": {"number": VERSION, "build_flavor": "default", "lucene_version": "9.11.1",
                        "minimum_wire_compatibility_version": "7.17.0",
                        "minimum_index_compatibility_version": "7.0.0"},
            "tagline": "You Know, for Search",
        })

    async def _index(self, request: web.Request) -> web.Response:
        name, method = request.match_info["index"], request.method
        if method == "PUT":
            if name in self.indices:
                raise EsError(400, "resource_already_exists_exception",
                              f"index [{name}/test] already exists", name)
            self._create_index(name, await self._json(request))
            return self._reply(request, 200, {"acknowledged": True, "shards_acknowledged": True, "index": name})
        if method == "HEAD":
            return self._reply(request, 200 if self._resolve(name, strict=False) else 404)
        if method == "DELETE":
            for found in self._resolve(name):
                del self.indices[found], self.index_meta[found]
            return self._reply(request, 200, {"acknowledged": True})
        if method == "GET":
            return self._reply(request, 200, {n: self.index_meta[n]["body"] for n in self._resolve(name)})
        raise web.HTTPMethodNotAllowed(method, ["PUT", "HEAD", "DELETE", "GET"])

    async def _template(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.method in ("PUT", "POST"):
            self.templates[name] = await self._json(request)
            return self._reply(request, 200, {"acknowledged": True})
        found = [n for n in sorted(self.templates) if fnmatch.fnmatchcase(n, name)]
        if not found:
            raise EsError(404, "resource_not_found_exception", f"index template matching [{name}] not found")
        if request.method == "DELETE":
            for n in found:
                del self.templates[n]
            return self._reply(request, 200, {"acknowledged": True})
        body = {"index_templates": [{"name": n, "index_template": self.templates[n]} for n in found]}
        return self._reply(request, 200, body)

    async def _bulk(self, request: web.Request) -> web.Response:
        self.bulk_queries.append(dict(request.query))
        if self._fail_bulk:
            status = self._fail_bulk.pop(0)
            kind = "es_rejected_execution_exception" if status == 429 else "test_injected_failure"
            raise EsError(status, kind, f"rejected execution of bulk request (injected, status {status})")
        default_index = request.match_info.get("index")
        lines = [ln for ln in (await request.read()).splitlines() if ln.strip()]
        values = self._bulk_values(lines)
        self._validate_ids(values)
        items, pos = [], 0
        while pos < len(lines):
            try:
                (action, meta), = values[pos].items()
                body = values[pos + 1] if action != "delete" else None
            except (AttributeError, ValueError, IndexError) as exc:
                raise EsError(400, "illegal_argument_exception", f"malformed bulk line {pos + 1}: {exc}")
            pos += 1 if action == "delete" else 2
            index, doc_id = meta.get("_index", default_index), meta.get("_id")
            if action not in ("index", "create", "update", "delete") or index is None:
                raise EsError(400, "action_request_validation_exception", f"bad bulk action [{action}]")
            if self._fail_items:
                status = self._fail_items.pop(0)
                items.append({action: {"_index": index, "_id": doc_id, "status": status, "error": {
                    "type": "es_rejected_execution_exception", "reason": f"injected per-document {status}"}}})
                continue
            try:
                status, result = self._write(action, index, doc_id, body, meta)
                result["status"] = status
                items.append({action: result})
            except EsError as exc:
                items.append({action: {"_index": index, "_id": doc_id, "status": exc.status,
                                       "error": exc.cause()}})
        errors = any("error" in item[next(iter(item))] for item in items)
        return self._reply(request, 200, {"took": 1, "errors": errors, "items": items})

    @staticmethod
    def _validate_ids(values: list[Any]) -> None:
        """As Elasticsearch does, an ``_id`` over 512 bytes refuses the whole request (400)."""
        for value in values:
            is_header = isinstance(value, dict) and len(value) == 1 and next(iter(value)) in BULK_ACTIONS
            meta = next(iter(value.values())) if is_header else None
            doc_id = meta.get("_id") if isinstance(meta, dict) else None
            if isinstance(doc_id, str) and len(doc_id.encode()) > MAX_ID_BYTES:
                raise EsError(400, "action_request_validation_exception",
                              f"Validation Failed: 1: id [{doc_id[:20]}...] is too long, must be no longer "
                              f"than {MAX_ID_BYTES} bytes but was: {len(doc_id.encode())};")

    @staticmethod
    def _bulk_values(lines: list[bytes]) -> list[Any]:
        """Every line of a bulk body parsed, in one call when they all parse (a line that does not
        is reported by the per-line parse, with its number)."""
        try:
            values = orjson.loads(b"[" + b",".join(lines) + b"]")
            if len(values) == len(lines):
                return values
        except ValueError:
            pass
        values = []
        for number, line in enumerate(lines, 1):
            try:
                values.append(orjson.loads(line))
            except ValueError as exc:
                raise EsError(400, "illegal_argument_exception", f"malformed bulk line {number}: {exc}")
        return values

    async def _doc(self, request: web.Request) -> web.Response:
        index, doc_id = request.match_info["index"], request.match_info.get("id")
        method = request.method
        if method in ("GET", "HEAD"):
            if index not in self.indices:
                raise EsError(404, "index_not_found_exception", f"no such index [{index}]", index)
            doc = self.indices[index].get(doc_id or "")
            if doc is None:
                return self._reply(request, 404, {"_index": index, "_id": doc_id, "found": False})
            return self._reply(request, 200, {"_index": index, "_id": doc_id, "_version": doc["_version"],
                                              "_seq_no": doc["_seq_no"], "_primary_term": 1,
                                              "found": True, "_source": doc["_source"]})
        if method == "DELETE":
            status, result = self._write("delete", index, doc_id, None, dict(request.query))
            return self._reply(request, status, result)
        if method not in ("PUT", "POST"):
            raise web.HTTPMethodNotAllowed(method, ["GET", "HEAD", "PUT", "POST", "DELETE"])
        create = "/_create/" in request.path or request.query.get("op_type") == "create"
        status, result = self._write("create" if create else "index", index, doc_id,
                                     await self._json(request), dict(request.query))
        return self._reply(request, status, result)

    async def _update(self, request: web.Request) -> web.Response:
        index, doc_id = request.match_info["index"], request.match_info["id"]
        status, result = self._write("update", index, doc_id, await self._json(request), {})
        return self._reply(request, status, result)

    def _matching(self, request: web.Request, body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        strict = request.query.get("ignore_unavailable") != "true"
        return [(name, doc_id, doc) for name in self._resolve(request.match_info.get("index"), strict)
                for doc_id, doc in self.indices[name].items()
                if matches(body.get("query"), doc_id, doc["_source"])]

    async def _search(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        hits = self._matching(request, body)
        specs = _sort_specs(body["sort"]) if body.get("sort") else []
        for field, desc in reversed(specs):  # stable multi-key sort; missing values last
            if field in ("_score", "_doc"):
                continue
            first = lambda h: (field_values(h[1], h[2]["_source"], field) or [None])[0]  # noqa: E731
            present = sorted((h for h in hits if first(h) is not None),
                             key=lambda h: _sort_key(first(h)), reverse=desc)
            hits = present + [h for h in hits if first(h) is None]
        start = int(body.get("from", request.query.get("from", 0)))
        size = int(body.get("size", request.query.get("size", 10)))
        out = []
        for name, doc_id, doc in hits[start:start + size]:
            hit: dict[str, Any] = {"_index": name, "_id": doc_id, "_score": None if specs else 1.0}
            if body.get("_source", True) is not False:
                hit["_source"] = doc["_source"]
            if specs:
                hit["sort"] = [(field_values(doc_id, doc["_source"], f) or [None])[0] for f, _ in specs]
            out.append(hit)
        return self._reply(request, 200, {
            "took": 1, "timed_out": False, "_shards": SHARDS,
            "hits": {"total": {"value": len(hits), "relation": "eq"},
                     "max_score": None if specs or not hits else 1.0, "hits": out},
        })

    async def _count(self, request: web.Request) -> web.Response:
        hits = self._matching(request, await self._json(request))
        return self._reply(request, 200, {"count": len(hits), "_shards": SHARDS})

    async def _refresh(self, request: web.Request) -> web.Response:
        n = len(self._resolve(request.match_info.get("index")))
        return self._reply(request, 200, {"_shards": {"total": n, "successful": n, "failed": 0}})


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
