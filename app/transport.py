"""The Kafka consumer transport of the worker: Faust's aiokafka driver without its per-record stall.

Registered through Faust's own extension point (the ``faust.transports`` entry point in
pyproject.toml) and chosen by the URL scheme ``streamspine://`` of ``broker_consumer``; the
producer keeps Faust's stock ``kafka://`` transport. ``FAST_CONSUMER=false`` switches back to the
stock consumer.

What it changes, with the measurements behind it (bench/README.md has the profiles):

1. Faust's ``Consumer._drain_messages`` hands each record to the conductor through
   ``await self.wait_first(callback(message), self.suspend_flow.wait())``. mode's ``wait_first``
   wraps the callback and three events in tasks, waits for the first, then cancels three: four
   tasks and about three event-loop turns per record (strace: 304,191 ``epoll_wait`` calls for
   100k records). That loop is what a profile shows as "idle in epoll". Here the callback is
   awaited inline while the flow runs; during a rebalance (``suspend_flow`` set) the stock,
   interruptible path is kept.
2. The stock loop asks ``getmany(timeout=1.0)``. When the stream buffer of a partition passes its
   high-water mark Faust drops that partition from the active set, and the next ``getmany`` often
   covers only drained partitions: it blocks the full second while the buffer empties in
   milliseconds (instrumented: 11.0 s of a 13.4 s run inside ``_wait_next_records``). Here the
   wait is ``GETMANY_TIMEOUT`` (50 ms).
3. Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting to change it.
   A broker that does not answer a waiting fetch as soon as data arrives (the local broker, Tansu
   0.6, holds it the full wait: 381 ms median latency per hop with 1500, 3 ms with 20) then adds up
   to that wait to every record. Here it is ``CONSUMER_FETCH_WAIT_MS`` (default 20 ms); a real
   Kafka answers early anyway, so the lower wait only costs a few more fetches while idle.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, ClassVar, Type, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka
from faust.types import ConsumerT

GETMANY_TIMEOUT = 0.05


class ConsumerThread(aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait of CONSUMER_FETCH_WAIT_MS."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        from app import settings  # the app is loaded before Faust builds its transport

        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when its fetcher starts (AIOKafkaConsumer.start), after this returns.
        consumer._fetch_max_wait_ms = settings.consumer_fetch_wait_ms
        return consumer


class Consumer(aiokafka.Consumer):
    """aiokafka consumer whose drain loop awaits each record inline and polls in short waits."""

    getmany_timeout: ClassVar[float] = GETMANY_TIMEOUT

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # Faust's loop, but for the two changes
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        flow_is_suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records = cast(AsyncIterator, getmany(timeout=self.getmany_timeout))
                await self.sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in records:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await asyncio.sleep(0)
                        num_since_yield = 0
                    offset = message.offset
                    read_offset = get_read_offset(tp)
                    if read_offset is not None and offset < read_offset:
                        continue  # already delivered before a seek
                    if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, read_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if flow_is_suspended():
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    else:
                        await callback(message)
                    set_read_offset(tp, offset)
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class Transport(aiokafka.Transport):
    """Faust's aiokafka transport with the consumer above (URL scheme ``streamspine://``)."""

    Consumer: ClassVar[Type[ConsumerT]] = Consumer

