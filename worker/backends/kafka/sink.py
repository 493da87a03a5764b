"""The ``kafka://`` dead-letter sink: each dead letter is a record of the dead-letter topic.

URI: the same as the ``kafka://`` source's (so ``--dlq`` may be left out, or repeat
``--source``): dead letters go to ``<topic>.dead-letters``, or to ``dead_topic=NAME``. The
source-only parameters are ignored here. Each record's value is one dead letter as JSON in the
documented shape (:func:`worker.deadletters.base.record`); its key is the change's ID when the
letter has one. ``init`` creates the topic; a cluster that auto-creates topics creates it too.

A write returns once every letter was acknowledged by the brokers (``acks=all``): as durable
as the topic's replication makes it. A write that fails because the brokers are unreachable is
retried with backoff until it succeeds (the engine waits, acknowledging nothing meanwhile); a
retry after a lost answer may write a letter twice: dead letters are at-least-once too.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import anyio
import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from worker.backends.kafka.uri import KafkaAddress, parse_uri
from worker.core.backoff import RECONNECT_BACKOFF
from worker.deadletters.base import DeadLetterError, DeadLetterSink

log = structlog.get_logger("worker.backends.kafka")


def letter_key(letter: dict[str, Any]) -> bytes | None:
    """The record key of a dead letter: its change's ID, if it has one."""
    change = letter.get("change")
    if isinstance(change, dict) and isinstance(change.get("ID"), str | int):
        return str(change["ID"]).encode()
    return None


class KafkaDeadLetters(DeadLetterSink):
    """Produces dead letters to a topic, waiting for every acknowledgement."""

    def __init__(self, address: KafkaAddress, *, rand: Callable[[], float] = random.random) -> None:
        self.address = address
        self.topic = address.dead_letter_topic
        self.name = f"kafka:{self.topic}"
        self._rand = rand
        self._producer: AIOKafkaProducer | None = None
        self.written = 0

    async def open(self) -> None:
        """Connect; DeadLetterError if the brokers are unreachable."""
        producer = AIOKafkaProducer(acks="all", **self.address.client_options())
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise DeadLetterError(
                f"cannot connect to kafka {self.address.display} for dead letters: {exc}"
            ) from exc
        self._producer = producer

    async def write(self, letters: list[dict[str, Any]]) -> None:
        """Produce every letter and wait for all acknowledgements; retried while the brokers
        are unreachable."""
        if not letters:
            return
        producer = self._producer
        if producer is None:
            raise DeadLetterError(f"{self.name}: not open")
        failures = 0
        while True:
            try:
                futures = [
                    await producer.send(self.topic, orjson.dumps(letter), key=letter_key(letter))
                    for letter in letters
                ]
                await asyncio.gather(*futures)
                break
            except KafkaError as exc:
                if not exc.retriable and not isinstance(exc, KafkaTimeoutError):
                    # Refused (authorization, size): no retry can help.
                    message = f"cannot write dead letters to {self.name}: {exc}"
                    raise DeadLetterError(message) from exc
                failures += 1
                delay_s = RECONNECT_BACKOFF.delay(failures, self._rand())
                log.warning(
                    "kafka.dead_letters_failed",
                    server=self.address.display,
                    attempt=failures,
                    error=repr(exc),
                    retry_in_s=round(delay_s, 3),
                )
                await anyio.sleep(delay_s)
        self.written += len(letters)

    async def close(self) -> None:
        """Disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


def from_uri(uri: str) -> KafkaDeadLetters:
    """The sink a ``kafka://`` URI names (not opened yet); ConfigError if the URI is bad."""
    return KafkaDeadLetters(parse_uri(uri))
