"""``manage.py bench_events [--events 3000]``: what one run event's transaction costs.

Times the ORM ``INSERT`` of an event alone and ``transitions.record`` (lock, seq, insert, announce),
interleaved, on a scratch run in DATABASE_URL's database that it deletes afterwards; prints the median of
each. Method and figures: docs/performance.md, "Run events: what numbering and announcing them costs".
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, transaction

from orchestration import transitions
from orchestration.models import Run, RunEvent

# The ORM-only variant numbers its events from here, clear of record()'s.
ORM_SEQ_BASE = 10**8


class Command(BaseCommand):
    help = "Time one run event's transaction: the ORM insert alone, and transitions.record()."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--events", type=int, default=3000, help="transactions per variant")

    def handle(self, *args: Any, events: int, **options: Any) -> None:
        owner = get_user_model().objects.create(username=f"bench-events-{uuid.uuid4().hex[:12]}")
        run = Run.objects.create(owner=owner, spec={"skill": "echo"})
        try:
            medians = measure(run.pk, events)
        finally:
            owner.delete()  # the run and its events go with it
        self.stdout.write(f"{connection.vendor}, {events} transactions each, p50:")
        for name, median in medians.items():
            self.stdout.write(f"  {name:<38} {median:.3f} ms")


def measure(run_id: int, rounds: int) -> dict[str, float]:
    def orm_insert(n: int) -> None:
        RunEvent.objects.create(run_id=run_id, seq=ORM_SEQ_BASE + n, type="bench", data={})

    def record(n: int) -> None:
        transitions.record(run_id, "bench")

    variants: dict[str, Callable[[int], None]] = {
        "ORM insert alone": orm_insert,
        "transitions.record (lock, insert, announce)": record,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for n in range(rounds):
        for name, variant in variants.items():
            started = time.perf_counter()
            with transaction.atomic():
                variant(n)
            samples[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}
