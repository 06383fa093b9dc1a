"""The processing runtime every agent shares: decode, dead-letter, batch, apply, acknowledge.

    async for batch in decoded_batches(stream, decode_order, max_=BATCH_MAX, within=BATCH_WITHIN):
        await until_applied(apply_orders, batch, what="orders")

- ``decode`` runs on each record; ANY exception it raises (a RecursionError from deep nesting, a
  ValueError from a 5,000-digit integer, an OverflowError from a date) is the record's fault: the
  record goes to ``<topic>.dlq`` with the reason and the rest of the batch goes on.
- The batch body runs under ``until_applied``: the one retry policy of app/retry.py (exponential
  backoff, for as long as it takes, never on cancellation). A body that raised would otherwise be acknowledged by
  ``take_events`` and lost; here the batch is applied or the worker stops trying, never skipped.
  Bodies must be idempotent (offset/LSN/version guards), since a retry runs them again.
- ``take_events`` acknowledges the events when the loop body returns, in read order, so offsets are
  committed only past records that were applied or dead-lettered.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, List, NamedTuple, Optional, TypeVar

import orjson
from faust.types import EventT, StreamT

from app.dead_letters import dead_letter
from app.retry import MAX_BACKOFF, apply_stats, retrying

T = TypeVar("T")


class Decoded(NamedTuple, Generic[T]):
    """A record that passed decoding and validation: its event and its value."""

    event: EventT
    value: T


class DecodedBatch(List[Decoded[T]]):
    """The records of a batch that passed decoding, in read order; ``refused`` holds the events
    that were dead-lettered instead (for the jobs that count them)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: List[EventT] = []


def reason_of(error: BaseException) -> str:
    """A dead letter's reason: the exception's type and message (messages of some are empty)."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - str() of a hostile value may itself fail
        text = ""
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def require_encodable(value: Any) -> Any:
    """``value`` if it can be written back as JSON (orjson: integers of at most 64 bits, str keys,
    nesting under 255 levels); raises ValueError otherwise. A result the worker cannot store
    or send must be refused when its record is decoded, not when the batch is written."""
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as error:
        raise ValueError(f"not writable as JSON: {error}") from None
    return value


async def decoded_batches(
    stream: StreamT,
    decode: Callable[[EventT], Optional[T]],
    *,
    max_: int,
    within: float,
) -> AsyncIterator[DecodedBatch[T]]:
    """Batches of up to ``max_`` records (or what arrived ``within`` seconds), decoded.

    ``decode`` returns the record's value, or None to skip it (a tombstone); any exception makes
    the record a dead letter. Every batch is yielded, even one whose records were all refused,
    so the caller sees the stream advance.
    """
    async for events in stream.take_events(max_, within=within):
        batch: DecodedBatch[T] = DecodedBatch()
        for event in events:
            try:
                value = decode(event)
            except Exception as error:  # noqa: BLE001 - any failure a record causes is its own
                await dead_letter(reason_of(error), event)
                batch.refused.append(event)
                continue
            if value is not None:
                batch.append(Decoded(event, value))
        yield batch


async def until_applied(apply: Callable[..., Awaitable[T]], *args: Any, what: str, max_backoff: Optional[float] = None) -> T:
    """``await apply(*args)`` until it returns, under the one retry policy."""
    started = time.perf_counter()
    async for attempt in retrying(what, max_backoff=max_backoff or MAX_BACKOFF):
        with attempt:
            result = await apply(*args)
    stats = apply_stats[what]
    stats.batches += 1
    stats.seconds += time.perf_counter() - started
    return result
