"""The one Elasticsearch sink: bulk writes through the official async client that never lose a
document and never give up while the cluster is away.

``BulkWriter.write(actions)`` returns only when every action is either stored or refused for good:

- connection errors, timeouts and whole-request 429/5xx answers are retried with exponential
  backoff (capped at ELASTICSEARCH_MAX_BACKOFF) for as long as it takes; the caller's events stay
  unacknowledged meanwhile, so the worker does not commit offsets past unwritten records;
- so are whole-request 401/403/404 answers (credentials expired or lacking a privilege, a proxy
  that does not route the path): they say nothing about the documents, and an operator fixes them,
  after which every document is written; so is a write to an index the cluster may not create by
  itself (per-document 404 ``index_not_found_exception``, ``action.auto_create_index`` false), until
  an operator creates it;
- per-document 429/5xx answers are retried the same way, only for those documents;
- a delete answered 404 (the document or its index is already gone) is done;
- a whole request refused with 400/413 (an ``_id`` over 512 bytes fails the request, not the item;
  a request too large), or a document the client cannot serialize, says nothing of the other
  documents: the request is split in halves and written again until the documents refused stand
  alone;
- per-document refusals (400 mapping errors, 409 version conflicts the caller did not expect, a
  document refused alone...) are returned as ``Rejection``s for the caller to dead-letter.

An action is a dict as the client's helpers take it (``{"_op_type": ..., "_index": ..., "_id": ...,
"_source": ...}``) or, cheaper on a hot path, the ``(header, body)`` pair the helpers expand such a
dict into (``({"index": {"_index": ..., "_id": ...}}, doc)``), passed through as it is.

Actions carry deterministic ``_id``s (and, where ordering matters, external versions), so a retry
or a redelivered record overwrites instead of duplicating.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import orjson
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, OrjsonSerializer, SerializationError
from elasticsearch import ApiError, AsyncElasticsearch
from elasticsearch.helpers import async_streaming_bulk, expand_action

from app.retry import retrying

log = logging.getLogger(__name__)

RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)
# A whole bulk request answered with one of these is retried too (see the module docstring).
RETRYABLE_REQUEST_STATUS = (401, 403, 404)
# A whole bulk request answered with one of these is split until the refused documents stand alone.
REFUSED_REQUEST_STATUS = (400, 413)
CHUNK_SIZE = 2000
MAX_CHUNK_BYTES = 16 * 1024 * 1024
# What the writer reads of a bulk answer: per item its index, id, status and error. Elasticsearch
# otherwise repeats version, sequence number and shard counts for every document.
BULK_FILTER_PATH = "errors,items.*._index,items.*._id,items.*.status,items.*.error"

BulkPair = Tuple[Dict[str, Dict[str, Any]], Optional[Dict[str, Any]]]
Action = Union[Dict[str, Any], BulkPair]


def bulk_pair(action: Action) -> BulkPair:
    """The ``(header, body)`` lines of an action (the helpers' ``expand_action_callback``)."""
    if isinstance(action, tuple):
        return action
    return expand_action(action)  # type: ignore[return-value]  # of a dict: ({op: meta}, dict or None), never bytes


def action_target(action: Action) -> Tuple[Optional[str], Optional[str]]:
    """``(_index, _id)`` of an action of either form."""
    if isinstance(action, tuple):
        meta = next(iter(action[0].values()))
        return meta.get("_index"), meta.get("_id")
    return action.get("_index"), action.get("_id")


@dataclass(frozen=True)
class Rejection:
    """A document Elasticsearch refused for good: its action and why."""

    action: Action
    status: Any
    reason: str

    @property
    def doc_id(self) -> Optional[str]:
        return action_target(self.action)[1]


class RetryLater(Exception):
    """Some documents met a transient failure; they are retried after a backoff."""


def is_retried(op_type: str, info: Mapping[str, Any]) -> bool:
    """A failed item to write again: a transient status; a whole-request failure (the helpers
    report one per document, with the request's exception) that waits for an operator; a write to
    an index the cluster may not create by itself (until an operator creates it)."""
    status = info.get("status")
    if is_transient(status):
        return True
    if "exception" in info:
        return status in RETRYABLE_REQUEST_STATUS
    error = info.get("error")
    return status == 404 and op_type != "delete" and isinstance(error, Mapping) and error.get("type") == "index_not_found_exception"


class DocumentSerializer(OrjsonSerializer):
    """orjson (~5x json), and a plain dict serialized in one call: the bulk helpers serialize each
    header and each document on their own, where the generic checks cost as much as orjson does."""

    def dumps(self, data: Any) -> bytes:
        if data.__class__ is dict:
            try:
                return orjson.dumps(data, default=self.default, option=orjson.OPT_SERIALIZE_NUMPY)
            except TypeError:
                pass  # the generic path raises the client's SerializationError
        return super().dumps(data)


def search_client(url: str) -> AsyncElasticsearch:
    """An async client whose own retries are off: BulkWriter is the one retry mechanism."""
    return AsyncElasticsearch(
        url,
        max_retries=0,
        retry_on_timeout=False,
        request_timeout=30,
        serializer=DocumentSerializer(),
    )


def failure_reason(info: Mapping[str, Any]) -> str:
    error = info.get("error")
    if isinstance(error, Mapping):
        reason = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        caused_by = error.get("caused_by")
        if isinstance(caused_by, Mapping):
            reason += f" (caused by {caused_by.get('type')}: {caused_by.get('reason')})"
        return reason
    return str(error)


def is_transient(status: Any) -> bool:
    """429 and 5xx, and no status at all (the request never got an answer)."""
    return not isinstance(status, int) or status in RETRYABLE_STATUS


def is_transient_error(error: BaseException) -> bool:
    """Worth retrying: no answer, a timeout, a 429/5xx answer, or documents left to retry."""
    if isinstance(error, (RetryLater, TransportConnectionError, ConnectionTimeout)):
        return True
    return isinstance(error, ApiError) and is_transient(error.meta.status if error.meta else None)


class BulkWriter:
    """Bulk-index, update or delete documents; see the module docstring for the guarantees."""

    def __init__(
        self,
        client: AsyncElasticsearch,
        *,
        max_backoff: float = 30.0,
        initial_backoff: float = 0.1,
        accept_status: Collection[int] = (),
    ) -> None:
        self.client = client
        self.max_backoff = max_backoff
        self.initial_backoff = initial_backoff
        self.accept_status = tuple(accept_status)  # e.g. 409 for external-version guards
        self.retries = 0

    async def write(self, actions: Sequence[Action]) -> List[Rejection]:
        """Write every action; returns the ones refused for good."""
        pending = list(actions)
        rejections: List[Rejection] = []
        policy = retrying(
            "Elasticsearch bulk write",
            max_backoff=self.max_backoff,
            initial=self.initial_backoff,
            retry_on=is_transient_error,
            on_retry=self._count_retry,
        )
        async for attempt in policy:
            with attempt:
                pending, reason = await self._write_split(pending, rejections)
                if pending:
                    raise RetryLater(f"{len(pending)} documents to write again ({reason})")
        return rejections

    async def _write_split(self, actions: List[Action], rejections: List[Rejection]) -> Tuple[List[Action], str]:
        """One pass over ``actions``, the documents of a request refused whole written again in
        halves until those refused stand alone (then each is a Rejection); returns those to retry
        (and why, for the log)."""
        try:
            retry, reason, found, refused = await self._write_once(actions)
        except SerializationError as error:  # raised before the request with the document: find it
            if len(actions) == 1:
                rejections.append(Rejection(actions[0], None, f"serialization_error: {error}"))
                return [], ""
            retry, reason, found, refused = [], "", [], [(action, None, "") for action in actions]
        rejections.extend(found)
        if len(refused) == 1:
            rejections.append(Rejection(*refused[0]))
        elif refused:
            middle = len(refused) // 2
            for half in (refused[:middle], refused[middle:]):
                half_retry, half_reason = await self._write_split([action for action, _, _ in half], rejections)
                retry.extend(half_retry)
                reason = reason or half_reason
        return retry, reason

    async def _write_once(self, actions: List[Action]) -> Tuple[List[Action], str, List[Rejection], List[Tuple[Action, Any, str]]]:
        """One pass over ``actions``: those to retry (and why, for the log), those refused for
        good, and those of a request refused whole (with its status and reason)."""
        by_id: Optional[Dict[Tuple[Optional[str], Optional[str]], Action]] = None
        retry: List[Action] = []
        rejections: List[Rejection] = []
        refused: List[Tuple[Action, Any, str]] = []
        reason = ""
        # The helpers are typed for dict and str actions, but hand every action as it is to
        # expand_action_callback: that is how (header, body) pairs pass through.
        async for ok, item in async_streaming_bulk(
            self.client,
            actions,  # type: ignore[arg-type]
            chunk_size=CHUNK_SIZE,
            max_chunk_bytes=MAX_CHUNK_BYTES,
            expand_action_callback=bulk_pair,  # type: ignore[arg-type]
            raise_on_error=False,
            raise_on_exception=False,
            yield_ok=False,
            ignore_status=self.accept_status,
            filter_path=BULK_FILTER_PATH,
        ):
            if ok:
                continue
            op_type, info = next(iter(item.items()))
            status = info.get("status")
            if isinstance(status, int) and status in self.accept_status:
                continue
            whole_request = "exception" in info
            if op_type == "delete" and status == 404 and not whole_request:
                continue  # the document, or its index, is already gone
            if by_id is None:  # built on the first failure only
                by_id = {action_target(action): action for action in actions}
            action = by_id.get((info.get("_index"), info.get("_id")))
            if action is None:  # a whole-request failure names no index: match by id alone
                action = next((a for a in actions if action_target(a)[1] == info.get("_id")), None)
            if action is None:
                continue
            if whole_request and status in REFUSED_REQUEST_STATUS:
                refused.append((action, status, failure_reason(info)))
            elif is_retried(op_type, info):
                retry.append(action)
                reason = reason or f"{status}: {failure_reason(info)}"
            else:
                rejections.append(Rejection(action, status, failure_reason(info)))
        return retry, reason, rejections, refused

    def _count_retry(self, state: Any) -> None:
        self.retries += 1

    async def close(self) -> None:
        await self.client.close()


async def put_index_template(
    client: AsyncElasticsearch, name: str, patterns: List[str], mappings: Dict[str, Any], *, max_backoff: float = 30.0
) -> None:
    """Create or replace an index template, retrying until the cluster answers."""
    async for attempt in retrying(f"storing index template {name}", max_backoff=max_backoff, retry_on=is_transient_error):
        with attempt:
            await client.indices.put_index_template(
                name=name,
                index_patterns=patterns,
                priority=200,
                template={"mappings": mappings},
                meta={"managed_by": "streamspine"},
            )


def optional_writer(url: Optional[str], max_backoff: float, **kwargs: Any) -> Optional[BulkWriter]:
    """A writer for ELASTICSEARCH_URL, or None when the sink is not configured."""
    return BulkWriter(search_client(url), max_backoff=max_backoff, **kwargs) if url else None
