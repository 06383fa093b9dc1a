"""Daily operations as Faust commands: ``faust -A app <command> --help``.

    faust -A app migration-phase canary --percent 10
    faust -A app silences list
    faust -A app silences add --match service=cart --hours 2 --comment "deploy"
    faust -A app cdc-status
    faust -A app dlq-replay metrics --reason 'ts' --dry-run

The first three talk to a worker's web server (``--url``, default this host's WEB_HOST:WEB_PORT)
with ADMIN_TOKEN where a change needs it; ``dlq-replay`` reads ``<topic>.dlq`` from Kafka and
produces the chosen records back to ``<topic>`` exactly as they were first written.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from faust.cli import argument, option

from app import app, settings
from app.dead_letters import DLQ_SUFFIX
from app.settings import bootstrap_servers

REPLAYED_FROM = "dlq.replayed-from"  # header of a replayed record: <dlq topic>/<partition>/<offset>

url_option = option("--url", default=settings.web_url, show_default=True, help="A worker's web address.")


# --- the web API ---------------------------------------------------------------------------------


async def call_worker(method: str, url: str, body: Optional[Dict[str, Any]] = None) -> Tuple[int, Any]:
    """One JSON request to a worker, with ADMIN_TOKEN when it is set."""
    headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.request(method, url, json=body, headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else None
            except json.JSONDecodeError:
                return response.status, text


def print_answer(status: int, answer: Any) -> None:
    """Print a worker's answer; a refusal ends the command with its status."""
    print(json.dumps(answer, indent=2, sort_keys=True))
    if status >= 400:
        raise SystemExit(f"the worker answered {status}")


@app.command(
    argument("phase", required=False, default=""),
    option("--percent", type=float, default=None, help="Share of orders V2 answers in the canary phase."),
    url_option,
)
async def migration_phase(self: Any, phase: str = "", percent: Optional[float] = None, url: str = "") -> None:
    """Show the migration's phase, or move it: faust -A app migration-phase [PHASE]."""
    if not phase:
        print_answer(*await call_worker("GET", f"{url}/migration/status/"))
        return
    body: Dict[str, Any] = {"phase": phase}
    if percent is not None:
        body["canary_percent"] = percent
    print_answer(*await call_worker("POST", f"{url}/migration/phase", body))


def matchers_of(pairs: Sequence[str]) -> List[Dict[str, Any]]:
    """``name=value`` (equality) and ``name=~regex`` pairs as Alertmanager matchers."""
    matchers = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--match {pair!r}: expected name=value or name=~regex")
        is_regex = value.startswith("~")
        matchers.append({"name": name, "value": value[1:] if is_regex else value, "is_regex": is_regex})
    return matchers


@app.command(
    argument("action", required=False, default="list"),
    option("--match", "matches", multiple=True, help="name=value or name=~regex; repeat for several (add)."),
    option("--hours", type=float, default=1.0, show_default=True, help="How long the silence lasts (add)."),
    option("--comment", default="", help="Why (add)."),
    option("--created-by", default="faust-cli", show_default=True),
    url_option,
)
async def silences(
    self: Any, action: str = "list", matches: Sequence[str] = (), hours: float = 1.0, comment: str = "", created_by: str = "", url: str = ""
) -> None:
    """List the silences, or add one: faust -A app silences [list|add] --match service=cart."""
    if action == "list":
        print_answer(*await call_worker("GET", f"{url}/alerts/silences"))
    elif action == "add":
        body = {"matchers": matchers_of(matches), "ends_at": time.time() + hours * 3600, "comment": comment, "created_by": created_by}
        print_answer(*await call_worker("POST", f"{url}/alerts/silences", body))
    else:
        raise SystemExit(f"unknown action {action!r}: use list or add")


@app.command(url_option)
async def cdc_status(self: Any, url: str = "") -> None:
    """Capture slot, lag and per-table apply counts of change data capture."""
    print_answer(*await call_worker("GET", f"{url}/cdc/status/"))


# --- dead-letter replay --------------------------------------------------------------------------


class ReplayFilter(NamedTuple):
    """Which dead letters to replay; every given criterion must hold."""

    reason: Optional[re.Pattern] = None
    key: Optional[bytes] = None
    partition: Optional[int] = None  # of the source topic
    since: Optional[float] = None  # epoch seconds the dead letter was written at or after

    def accepts(self, record: ConsumerRecord) -> bool:
        headers = dict(record.headers or ())
        if self.reason is not None and not self.reason.search(headers.get("dlq.reason", b"").decode("utf-8", "replace")):
            return False
        if self.key is not None and record.key != self.key:
            return False
        if self.partition is not None and headers.get("dlq.partition") != str(self.partition).encode():
            return False
        return self.since is None or record.timestamp >= self.since * 1000


def replayed_record(dlq_topic: str, record: ConsumerRecord) -> Tuple[Optional[bytes], Optional[bytes], List[Tuple[str, bytes]]]:
    """Key, value and headers of a dead letter sent back to its topic: as first written, the
    ``dlq.*`` headers replaced by where it was replayed from."""
    headers = [(name, value) for name, value in (record.headers or ()) if not name.startswith("dlq.")]
    headers.append((REPLAYED_FROM, f"{dlq_topic}/{record.partition}/{record.offset}".encode()))
    return record.key, record.value, headers


async def read_dead_letters(dlq_topic: str, accept: ReplayFilter) -> List[ConsumerRecord]:
    """Every dead letter of ``dlq_topic`` up to its end when the command started that ``accept``s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(settings.kafka_broker), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        if not consumer.partitions_for_topic(dlq_topic):  # not in the first metadata: ask once more
            await consumer.client.force_metadata_update()
        partitions = [TopicPartition(dlq_topic, p) for p in sorted(consumer.partitions_for_topic(dlq_topic) or ())]
        if not partitions:
            raise SystemExit(f"no topic {dlq_topic!r}: nothing was dead-lettered from it yet")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        chosen: List[ConsumerRecord] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batches = await consumer.getmany(*partitions, timeout_ms=1000)
            for tp, records in batches.items():
                chosen.extend(record for record in records if record.offset < ends[tp] and accept.accepts(record))
        return chosen
    finally:
        await consumer.stop()


def describe_letter(record: ConsumerRecord) -> str:
    headers = dict(record.headers or ())
    origin = "{}[{}]@{}".format(*(headers.get(name, b"?").decode() for name in ("dlq.topic", "dlq.partition", "dlq.offset")))
    dropped = " (value dropped: too large)" if "dlq.value-dropped" in headers else ""
    return f"{origin}: {headers.get('dlq.reason', b'').decode('utf-8', 'replace')[:160]}{dropped}"


@app.command(
    argument("topic"),
    option("--reason", default=None, help="Only dead letters whose reason matches this regular expression."),
    option("--key", default=None, help="Only records with this key (UTF-8)."),
    option("--partition", type=int, default=None, help="Only records that came from this partition of the topic."),
    option("--since", type=float, default=None, help="Only dead letters written at or after this epoch time."),
    option("--limit", type=int, default=None, help="Replay at most this many."),
    option("--dry-run", is_flag=True, default=False, help="Only list what would be replayed."),
)
async def dlq_replay(
    self: Any,
    topic: str,
    reason: Optional[str] = None,
    key: Optional[str] = None,
    partition: Optional[int] = None,
    since: Optional[float] = None,
    limit: Optional[int] = None,
    dry_run: bool = False,
) -> None:
    """Send dead letters of TOPIC (read from TOPIC.dlq) back to TOPIC after a fix."""
    if topic.endswith(DLQ_SUFFIX):
        topic = topic[: -len(DLQ_SUFFIX)]
    dlq_topic = topic + DLQ_SUFFIX
    accept = ReplayFilter(re.compile(reason) if reason else None, key.encode() if key is not None else None, partition, since)
    letters = await read_dead_letters(dlq_topic, accept)
    letters = letters[:limit] if limit is not None else letters
    replayable = [record for record in letters if "dlq.value-dropped" not in dict(record.headers or ())]
    for record in letters:
        print(("would replay " if dry_run else "replaying ") + describe_letter(record))
    skipped = len(letters) - len(replayable)
    if dry_run:
        print(f"{len(replayable)} of {len(letters)} matching dead letters would go back to {topic} ({skipped} without their value)")
        return
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers(settings.kafka_broker), acks="all", max_request_size=app.conf.producer_max_request_size
    )
    await producer.start()
    try:
        deliveries = []
        for record in replayable:
            record_key, value, headers = replayed_record(dlq_topic, record)
            deliveries.append(await producer.send(topic, key=record_key, value=value, headers=headers))
        for delivery in deliveries:
            await delivery
    finally:
        await producer.stop()
    print(f"replayed {len(replayable)} of {len(letters)} matching dead letters to {topic} ({skipped} without their value)")
