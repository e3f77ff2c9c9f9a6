"""The chaos scenarios: what each one breaks, and what it expects to survive (docs/chaos.md).

Needs no Django setup (``stack`` is only a type here), so the driver can list the
scenarios before any scenario environment exists.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .api import Api, Reply
from .outcome import Outcome
from .processes import wait_until

if TYPE_CHECKING:
    from .stack import Stack

# How long the runs of a batch may take to end once the fault is over.
RUN_BOUND = 120
REDIS_OUTAGE = 3
POSTGRES_OUTAGE = 30
POSTGRES_RUN_BOUND = 180
KILL_WORKER_BATCH = 5
POSTERS = 4
POSTS_PER_SECOND = 20


def effect(seconds: float, key: str | None = None) -> dict[str, Any]:
    """An ``effect`` step with short time limits (5 and 8 s), so a step whose worker vanished counts as lost soon.

    That is its hard limit plus STEP_LEASE_GRACE after it started.
    """
    step: dict[str, Any] = {"skill": "effect", "args": {"seconds": seconds}, "soft_time_limit": 5, "time_limit": 8}
    if key is not None:
        step["id"] = key
    return step


def chain(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"chain": list(nodes)}


def expect_all_succeeded(outcome: Outcome) -> None:
    outcome.expect(outcome.succeeded == outcome.runs, f"{outcome.runs - outcome.succeeded} runs did not succeed")


def kill_pool_child(stack: Stack, runs: int) -> Outcome:
    """One run at a time: SIGKILL the pool child running the middle step; the run must succeed, each effect once."""
    spec = chain(effect(0, "first"), effect(1.5, "slow"), effect(0, "last"))
    ids, kills = _kill_slow_step_of_each(stack, spec, runs)
    outcome = stack.outcome(ids)
    outcome.extra["kills"] = kills
    expect_all_succeeded(outcome)
    outcome.expect(kills == runs, f"{runs - kills} kills missed their step")
    return outcome


def _kill_slow_step_of_each(stack: Stack, spec: dict[str, Any], runs: int) -> tuple[list[int], int]:
    """Start the runs one at a time, SIGKILL the pool child running each one's "slow" step; (run ids, kills)."""
    ids, kills = [], 0
    for _ in range(runs):
        ids.append(stack.start_run(spec))
        kills += stack.kill_pool_child(ids[-1], "slow") is not None
        stack.wait_terminal(ids[-1:], RUN_BOUND)
    return ids, kills


def kill_worker(stack: Stack, kills: int) -> Outcome:
    """Batches of runs in flight: SIGKILL the whole worker, start a new one; every run must end, effects once."""
    spec = chain(effect(0.5), effect(1), effect(0.5))
    ids: list[int] = []
    for _ in range(kills):
        batch = [stack.start_run(spec) for _ in range(KILL_WORKER_BATCH)]
        ids += batch
        stack.wait_running_steps(batch, at_least=3, timeout=15)
        stack.kill_worker()
        stack.start_worker()
        stack.wait_terminal(batch, RUN_BOUND)
    outcome = stack.outcome(ids)
    outcome.extra["kills"] = kills
    return outcome


def kill_chord_member(stack: Stack, runs: int) -> Outcome:
    """SIGKILL the pool child running a chord's slow header member; the body's effect must happen once per run."""
    fast = [effect(0.2, f"fast-{n}") for n in range(1, 5)]
    spec = {"chord": {"header": [*fast[:2], effect(1.5, "slow"), *fast[2:]], "body": effect(0, "body")}}
    ids, kills = _kill_slow_step_of_each(stack, spec, runs)
    outcome = stack.outcome(ids)
    bodies = stack.effect_counts([f"{run_id}:body" for run_id in ids])
    outcome.extra.update(kills=kills, body_effects=sum(bodies.values()))
    expect_all_succeeded(outcome)
    outcome.expect(
        all(bodies.get(f"{run_id}:body") == 1 for run_id in ids), "a chord body's effect was not applied once"
    )
    outcome.expect(kills == runs, f"{runs - kills} kills missed their step")
    return outcome


@dataclass
class PacedPoster:
    """Posts ``total`` runs at a steady overall pace from a few threads, and keeps every answer."""

    api: Api
    conversation: int
    spec: dict[str, Any]
    total: int
    replies: list[Reply] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._started = 0.0
        self._threads = [threading.Thread(target=self._post, daemon=True) for _ in range(POSTERS)]

    def start(self) -> None:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _post(self) -> None:
        while (number := self._next()) < self.total:
            time.sleep(max(0.0, self._started + number / POSTS_PER_SECOND - time.monotonic()))
            reply = self.api.start_run(self.conversation, self.spec)
            with self._lock:
                self.replies.append(reply)

    def _next(self) -> int:
        with self._lock:
            return next(self._numbers)

    def answered(self) -> int:
        with self._lock:
            return len(self.replies)


def redis_restart(stack: Stack, runs: int) -> Outcome:
    """Restart Redis (nothing saved) while runs are being posted; every accepted run must succeed, no 500s."""
    poster = PacedPoster(stack.api, stack.conversation, chain(effect(0), effect(0)), runs)
    poster.start()
    wait_until(lambda: poster.answered() >= runs // 2, timeout=120)
    assert stack.redis is not None
    stack.redis.shutdown()
    time.sleep(REDIS_OUTAGE)
    stack.redis.start()
    poster.join()
    answers = Counter(reply.status for reply in poster.replies)
    ids = [int(reply.body["id"]) for reply in poster.replies if reply.status == 202]
    stack.wait_terminal(ids, RUN_BOUND)
    outcome = stack.outcome(ids)
    other = {status: n for status, n in answers.items() if status not in (202, 503)}
    unclear = [reply for reply in poster.replies if reply.status == 503 and not _says_why(reply)]
    outcome.extra.update(posted=runs, accepted=answers[202], refused=answers[503], other_answers=sum(other.values()))
    expect_all_succeeded(outcome)
    outcome.expect(not other, f"answers other than 202/503: {other}, e.g. {_first(poster.replies, other)}")
    outcome.expect(not unclear, f"{len(unclear)} 503s without a JSON detail, e.g. {unclear[:1]}")
    return outcome


def postgres_stop(stack: Stack, runs: int) -> Outcome:
    """Stop PostgreSQL for 30 s under load; every run must end; /readyz must go 503 and back to 200."""
    assert stack.postgres is not None
    spec = chain(effect(1), effect(1), effect(1))
    ids = [stack.start_run(spec) for _ in range(runs)]
    readyz = stack.watch_readyz()
    wait_until(lambda: readyz.seen(200, since=0), timeout=15)
    stack.wait_running_steps(ids, at_least=2, timeout=20)
    stopped = time.monotonic()
    stack.postgres.stop("fast")
    time.sleep(POSTGRES_OUTAGE)
    stack.postgres.start()
    restarted = time.monotonic()
    stack.wait_terminal(ids, POSTGRES_RUN_BOUND)
    wait_until(lambda: readyz.seen(200, restarted), timeout=30)
    readyz.stop()
    outcome = stack.outcome(ids)
    outcome.extra["readyz"] = readyz.summary()
    if readyz.available:
        outcome.expect(readyz.seen(503, stopped, restarted), "/readyz did not answer 503 while PostgreSQL was down")
        outcome.expect(readyz.seen(200, restarted), "/readyz did not answer 200 after PostgreSQL came back")
    return outcome


def sigterm(stack: Stack, runs: int) -> Outcome:
    """SIGTERM the worker under load (warm shutdown), start a new one; every run must succeed."""
    spec = chain(effect(0.5), effect(0.5), effect(0.5))
    ids = [stack.start_run(spec) for _ in range(runs)]
    stack.wait_running_steps(ids, at_least=3, timeout=15)
    seconds = stack.terminate_worker(timeout=60)
    stack.start_worker()
    stack.wait_terminal(ids, RUN_BOUND)
    outcome = stack.outcome(ids)
    outcome.extra["shutdown"] = f"{seconds:.1f}s" if seconds is not None else "none"
    outcome.expect(seconds is not None, "the worker did not exit within 60 s of SIGTERM")
    expect_all_succeeded(outcome)
    return outcome


def _says_why(reply: Reply) -> bool:
    return isinstance(reply.body, dict) and bool(reply.body.get("detail"))


def _first(replies: list[Reply], statuses: dict[int, int]) -> str:
    return next((str(reply) for reply in replies if reply.status in statuses), "")


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Stack, int], Outcome]
    runs: int  # the default count (--runs): runs, or for kill-worker the kills
    postgres: bool = False


SCENARIOS = {
    scenario.name: scenario
    for scenario in [
        Scenario("kill-pool-child", kill_pool_child, 20),
        Scenario("kill-worker", kill_worker, 10),
        Scenario("kill-chord-member", kill_chord_member, 20),
        Scenario("redis-restart", redis_restart, 200),
        Scenario("postgres-stop", postgres_stop, 50, postgres=True),
        Scenario("sigterm", sigterm, 40),
    ]
}
