"""One scenario's running service, and the ways the scenario observes and hurts it.

Import only after ``django.setup()`` with the scenario's environment (``child.py`` does).
Every database read tolerates an unreachable database: it answers None, and the caller
polls again.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import DatabaseError, connections
from django.db.models import Count
from kombu.exceptions import KombuError
from redis import RedisError
from rest_framework.authtoken.models import Token

from agentsite.celery import app
from orchestration.models import ACTIVE_RUN_STATUSES, Run, RunStatus, Step, StepStatus
from skills.models import Effect

from .api import Api
from .outcome import Outcome
from .processes import (
    PostgresCluster,
    RedisServer,
    ScenarioError,
    Service,
    Supervisor,
    kill_group,
    parent_pid,
    procfile_command,
    procfile_service,
    wait_until,
)

log = logging.getLogger("chaos")
T = TypeVar("T")


@dataclass(frozen=True)
class Worker:
    name: str
    service: Service


@dataclass(frozen=True)
class Tally:
    """Where a set of runs ended, and how often each of their effects was applied."""

    succeeded: int
    failed: int
    lost: int
    duplicated: dict[str, int]
    missing: list[str]


def query(read: Callable[[], T]) -> T | None:
    """``read()``, or None when the database cannot be reached (the connection is dropped, to reconnect)."""
    try:
        return read()
    except DatabaseError:
        connections.close_all()
        return None


def answers_ping(worker: str, timeout: float) -> bool:
    """Whether the worker answers a Celery ping, asked on a fresh broker connection.

    A pooled connection may predate a Redis restart.
    """
    try:
        with app.connection_for_write() as connection:
            return bool(app.control.ping([worker], timeout=timeout, connection=connection))
    except (OSError, KombuError, RedisError):
        return False


class Stack:
    """The scenario's Redis, database, web, worker and beat, started as the Procfile says."""

    worker: Worker  # the current one (start_worker)
    role = "chaos"  # names the API user and the workers

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        env: dict[str, str],
        redis: RedisServer | None,
        postgres: PostgresCluster | None,
    ) -> None:
        self.supervisor = supervisor
        self.name = name
        self.env = env
        self.redis = redis
        self.postgres = postgres
        self.procfile = Path(settings.BASE_DIR) / "Procfile"
        self.api = Api(f"http://127.0.0.1:{env['PORT']}")
        self.workers_started = 0
        # Web, workers and beat that should be up: one that exited on its own is a finding.
        self.expected_up: list[Service] = []
        self.conversation = 0
        self.user: User | None = None

    def start(self) -> None:
        """Migrate, make the API user, start web, a worker and beat, and open a conversation."""
        self.make_user()
        self.start_web()
        self.start_worker()
        self.start_beat()
        self.conversation = self.api.create_conversation(self.name)

    def make_user(self) -> None:
        """Migrate, and make the API user (``self.user``) with its token."""
        call_command("migrate", interactive=False, verbosity=0)
        self.user = User.objects.create_user(self.role)
        self.api.token = Token.objects.create(user=self.user).key

    def _start(self, name: str, process: str, extra: list[str]) -> Service:
        command = procfile_command(self.procfile, process)
        service = procfile_service(self.supervisor, name, command, extra, self.env, Path(settings.BASE_DIR))
        self.expected_up.append(service)
        return service

    def start_web(self) -> None:
        web = self._start("web", "web", [])
        answers = wait_until(lambda: not web.alive() or self.api.get("/healthz", 1).status == 200, 30, 0.2)
        if not answers or not web.alive():
            raise ScenarioError("web did not answer /healthz within 30 s; see web.log")

    def start_worker(self) -> Worker:
        """Start a worker (worker-N.log) and wait until it answers a ping; it becomes ``self.worker``."""
        self.workers_started += 1
        name = f"{self.role}-{self.workers_started}@localhost"
        service = self._start(f"worker-{self.workers_started}", "worker", ["--hostname", name])
        ready = wait_until(lambda: not service.alive() or answers_ping(name, timeout=0.5), 60)
        if not ready or not service.alive():
            raise ScenarioError(
                f"worker {name} did not answer a ping within 60 s; see worker-{self.workers_started}.log"
            )
        self.worker = Worker(name, service)
        return self.worker

    def start_beat(self) -> None:
        schedule = self.supervisor.directory / "celerybeat-schedule"
        # Appended: the last --schedule wins over the Procfile's.
        beat = self._start("beat", "beat", ["--schedule", str(schedule)])
        if wait_until(lambda: not beat.alive(), 2):
            raise ScenarioError("beat exited at start; see beat.log")

    def start_run(self, spec: dict[str, Any], input: Any = None) -> int:
        """Start a run through the API; its id."""
        reply = self.api.start_run(self.conversation, spec, input)
        if reply.status != 202:
            raise ScenarioError(f"POST runs answered {reply}")
        return int(reply.body["id"])

    # --- waiting ---------------------------------------------------------------

    def wait_terminal(self, ids: list[int], timeout: float) -> bool:
        """Whether every run in ``ids`` ended within ``timeout`` seconds."""

        def ended() -> bool:
            return query(Run.objects.filter(pk__in=ids, status__in=ACTIVE_RUN_STATUSES).exists) is False

        return wait_until(ended, timeout, 0.25)

    def wait_running_steps(self, ids: list[int], at_least: int, timeout: float) -> bool:
        """Whether at least ``at_least`` steps of these runs were running at once within ``timeout``."""
        running = Step.objects.filter(run_id__in=ids, status=StepStatus.RUNNING)
        return wait_until(lambda: (query(running.count) or 0) >= at_least, timeout, 0.05)

    def watch_readyz(self) -> ReadyzWatch:
        """Start polling /readyz in a thread (stop it with ``.stop()``)."""
        watch = ReadyzWatch(self.api)
        watch.start()
        return watch

    # --- faults ---------------------------------------------------------------

    def kill_pool_child(self, run_id: int, key: str, timeout: float = 15) -> int | None:
        """SIGKILL the pool child running step ``key`` of the run, as soon as it runs.

        Returns the pid killed, or None (a missed kill) when the step ended before it was seen running in a pool child.
        """
        running = Step.objects.filter(run_id=run_id, key=key, status=StepStatus.RUNNING)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            step_id = query(running.values_list("pk", flat=True).first)
            pid = self._pool_child_running(step_id) if step_id else None
            if pid:
                os.kill(pid, signal.SIGKILL)
                log.info("run %s: SIGKILL pool child %s running step %s", run_id, pid, key)
                return pid
            if query(Run.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES).exists) is False:
                break
            time.sleep(0.02)
        log.info("run %s: missed step %s (never seen running in a pool child)", run_id, key)
        return None

    def _pool_child_running(self, step_id: int) -> int | None:
        """The pid of our worker's pool child that runs this step's task (Celery's inspect active)."""
        with app.connection_for_write() as connection:
            replies = app.control.inspect([self.worker.name], timeout=1, connection=connection).active() or {}
        for task in itertools.chain.from_iterable(replies.values()):
            if task.get("name") == "agentsite.run_step" and (task.get("kwargs") or {}).get("step_id") == step_id:
                pid = task.get("worker_pid")
                # Never the main process, never a stranger: only a child of our worker.
                if pid and parent_pid(pid) == self.worker.service.pid:
                    return int(pid)
        return None

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group: its main process and pool children."""
        self.expected_up.remove(self.worker.service)
        kill_group(self.worker.service.pid)
        self.worker.service.wait(10)
        log.info("SIGKILL worker %s (process group %s)", self.worker.name, self.worker.service.pid)

    def terminate_worker(self, timeout: float) -> float | None:
        """SIGTERM the worker's main process (warm shutdown); seconds until it exited, None if it did not."""
        self.expected_up.remove(self.worker.service)
        started = time.monotonic()
        os.kill(self.worker.service.pid, signal.SIGTERM)
        exited = self.worker.service.wait(timeout)
        seconds = time.monotonic() - started
        log.info("SIGTERM worker %s: %s after %.1f s", self.worker.name, "exited" if exited else "still up", seconds)
        if not exited:
            kill_group(self.worker.service.pid)
        return seconds if exited else None

    # --- figures ---------------------------------------------------------------

    def outcome(self, ids: list[int]) -> Outcome:
        """These runs' figures, with the problems every scenario rejects: lost runs, effects applied twice or never,
        a web, worker or beat process that exited without being told to, and a worker that stopped answering.
        """
        tally = self.tally(ids)
        outcome = Outcome(
            self.name,
            runs=len(ids),
            succeeded=tally.succeeded,
            failed=tally.failed,
            lost=tally.lost,
            duplicated_effects=len(tally.duplicated),
        )
        outcome.expect(not tally.lost, f"{tally.lost} runs not terminal")
        outcome.expect(not tally.duplicated, f"{len(tally.duplicated)} effects applied twice or more")
        if tally.missing:
            outcome.extra["missing_effects"] = len(tally.missing)
            outcome.problems.append(f"{len(tally.missing)} succeeded effect steps applied no effect")
        outcome.problems += self._process_problems()
        self._describe(ids, tally)
        return outcome

    def _process_problems(self) -> list[str]:
        """Processes that should be up and are not: exited on their own, or a worker that no longer answers."""
        problems = [
            f"{service.name} exited on its own (code {service.process.returncode})"
            for service in self.expected_up
            if not service.alive()
        ]
        worker = self.worker.service
        if worker in self.expected_up and worker.alive() and not answers_ping(self.worker.name, timeout=2):
            problems.append(f"{worker.name} runs but does not answer a ping (stuck in a shutdown?)")
        return problems

    def tally(self, ids: list[int]) -> Tally:
        """Count outcomes and effects (waits up to a minute for the database to answer)."""
        deadline = time.monotonic() + 60
        while (tally := query(lambda: self._tally(ids))) is None:
            if time.monotonic() > deadline:
                raise ScenarioError("the database did not answer for a minute")
            time.sleep(1)
        return tally

    def effect_counts(self, keys: list[str]) -> dict[str, int]:
        """How often each of these effect keys was applied (absent: never)."""
        return dict(Effect.objects.filter(key__in=keys).values_list("key").annotate(n=Count("id")))

    def _tally(self, ids: list[int]) -> Tally:
        statuses = dict(Run.objects.filter(pk__in=ids).order_by().values_list("status").annotate(n=Count("id")))
        counts = dict(Effect.objects.filter(run_id__in=ids).values_list("key").annotate(n=Count("id")))
        succeeded_effects = Step.objects.filter(run_id__in=ids, skill="effect", status=StepStatus.SUCCEEDED)
        keys = [f"{run_id}:{key}" for run_id, key in succeeded_effects.values_list("run_id", "key")]
        active = sum(statuses.get(status, 0) for status in ACTIVE_RUN_STATUSES)
        return Tally(
            succeeded=statuses.get(RunStatus.SUCCEEDED, 0),
            failed=len(ids) - active - statuses.get(RunStatus.SUCCEEDED, 0),
            lost=active,
            duplicated={key: n for key, n in counts.items() if n > 1},
            missing=[key for key in keys if key not in counts],
        )

    def _describe(self, ids: list[int], tally: Tally) -> None:
        """Log every run that did not succeed, with its steps, and every duplicated or missing effect."""
        for run in Run.objects.filter(pk__in=ids).exclude(status=RunStatus.SUCCEEDED).prefetch_related("steps"):
            steps = "; ".join(
                f"{step.key}={step.status} attempts={step.attempts} {step.error[:200]}".rstrip()
                for step in run.steps.all()
            )
            log.info("run %s %s: %s | steps: %s", run.pk, run.status, run.error[:300], steps)
        for key, n in tally.duplicated.items():
            log.info("effect %s applied %s times", key, n)
        for key in tally.missing:
            log.info("effect %s: step succeeded, no effect row", key)


class ReadyzWatch(threading.Thread):
    """Polls GET /readyz every half second and keeps the answers, for a report like ``200>503>200``."""

    def __init__(self, api: Api) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.answers: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            reply = self.api.get("/readyz", timeout=5)
            if not self.answers or self.answers[-1][1] != reply.status:
                log.info("readyz: %s", reply)
            self.answers.append((time.monotonic(), reply.status))
            self.stopped.wait(0.5)

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    @property
    def available(self) -> bool:
        return bool(self.answers) and self.answers[0][1] != 404

    def seen(self, status: int, since: float, until: float = float("inf")) -> bool:
        return any(since <= at <= until and answer == status for at, answer in self.answers)

    def summary(self) -> str:
        """The distinct answers in order (0: no answer), e.g. ``200>503>200``; ``n/a`` without /readyz."""
        if not self.available:
            return "n/a"
        return ">".join(str(status) for status, _ in itertools.groupby(answer for _, answer in self.answers))
