"""Starting, cancelling, replaying and sweeping runs.

State changes themselves go through ``orchestration.state``; this module
decides what to change and talks to the broker (publish, revoke).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable

from agentsite import telemetry
from agentsite.celery import app
from skills.budget import Deadline
from skills.support import pii

from . import canvas, double_texting, metrics, rows, state, webhooks
from .models import (
    ACTIVE_RUN_STATUSES,
    Compensation,
    Conversation,
    IdempotencyKey,
    Message,
    MessageRole,
    OnActive,
    Run,
    RunStatus,
    Step,
    StepStatus,
    Workflow,
)
from .spec import ROOT, PlannedStep, SpecError, plan

log = logging.getLogger(__name__)

SWEEP_BATCH = 200  # runs per kind per sweep: a backlog drains over a few sweeps


class Conflict(Exception):
    """The run is not in a state that allows the action; the message says why."""


@dataclass(frozen=True)
class NewRun:
    """A run's rows, with their INSERTs built before the transaction that runs them (``insert_run``).

    Building them is most of the work of inserting them, and on SQLite a
    transaction holds the one write lock that every worker's step
    transition waits for (orchestration/rows.py, docs/performance.md).
    """

    run: Run
    planned: list[PlannedStep]
    steps: list[Step]
    inserts: tuple[rows.Insert, rows.Insert, rows.Insert]  # the run, its steps, its first event


def prepare_run(
    *,
    owner: Any,
    spec: Any,
    input: Any = None,
    conversation: Conversation | None = None,
    workflow: Workflow | None = None,
    deadline: float | None = None,
    webhook_url: str = "",
) -> NewRun:
    """A queued run with its pending steps, ready to insert; raises SpecError for an invalid spec.

    ``deadline`` (seconds) overrides the workflow's, which overrides
    RUN_DEFAULT_DEADLINE; ``webhook_url`` likewise overrides the workflow's,
    which overrides the conversation's.
    """
    planned = plan(spec)
    seconds = deadline or (workflow.deadline if workflow else None) or settings.RUN_DEFAULT_DEADLINE
    run = Run(
        owner=owner,
        conversation=conversation,
        workflow=workflow,
        spec=spec,
        input=input,
        deadline=timezone.now() + timedelta(seconds=min(seconds, settings.RUN_MAX_DEADLINE)),
        webhook_url=webhook_url
        or (workflow.webhook_url if workflow else "")
        or (conversation.webhook_url if conversation else ""),
        trace_id=telemetry.current_trace_id(),
        last_event_seq=1,  # its first event goes in with it
    )
    steps = [_step_row(run, p) for p in planned]
    inserts = (
        rows.Insert.of([run], later={"waiting_for_id"}),
        rows.Insert.of(steps, later={"run_id"}),
        state.first_event("run.queued", steps=len(steps)),
    )
    return NewRun(run, planned, steps, inserts)


def start_run(*, waiting_for: int | None = None, **run: Any) -> Run:
    """Insert a queued run with its pending steps (``prepare_run``'s arguments); publish once committed."""
    return insert_run(prepare_run(**run), waiting_for)


def insert_run(new: NewRun, waiting_for: int | None = None) -> Run:
    """Insert the prepared run with its pending steps; publish once committed.

    If the broker is down the run stays queued and the sweeper publishes it
    later. With ``waiting_for`` the run is held, not published: it starts
    when that run ends (orchestration.double_texting).
    """
    run = new.run
    state.insert_run(*new.inserts, waiting_for=waiting_for)
    metrics.run_started(run.workflow.name if run.workflow else None)
    if waiting_for is not None:
        return run
    budget = Deadline.of_run(run.created_at, run.deadline).as_kwarg()
    options = {
        p.path: canvas.StepOptions.for_step(p, s.pk, str(s.task_id), budget)
        for p, s in zip(new.planned, new.steps, strict=True)
    }
    transaction.on_commit(lambda: enqueue(run.pk, run.spec, run.input, options))
    return run


def start_conversation_run(
    *, conversation: Conversation, on_active: str, new: NewRun
) -> tuple[Run, double_texting.Admission]:
    """Start the prepared run ``new`` of ``conversation`` under the double-texting policy ``on_active``.

    Raises double_texting.Busy (``reject`` while a run is active: nothing is stored).
    """
    if on_active == OnActive.ALLOW:
        # Nothing to decide or lock: the insert is a transaction of its own (one statement on PostgreSQL).
        return insert_run(new), double_texting.Admission(on_active)
    with transaction.atomic():
        admission = double_texting.admit(conversation, on_active)
        started = insert_run(new, waiting_for=admission.waiting_for)
        double_texting.apply(started, admission)
    return started, admission


def post_message(
    *,
    conversation: Conversation,
    content: str,
    spec: Any,
    workflow: Workflow | None,
    on_active: str = double_texting.OnActive.ENQUEUE,
    deadline: float | None = None,
    webhook_url: str = "",
) -> tuple[Message, double_texting.Admission]:
    """Store a user message and start the run that answers it (under ``on_active``, as start_conversation_run).

    When the run's first step is ``mask_pii`` the message is masked here,
    before it is stored anywhere: the Message row and the run's input hold
    the masked content, and the input's ``pii`` counts what was masked.
    """
    input = masked_at_intake(spec, {"content": content, "conversation_id": conversation.pk})
    new = prepare_run(
        owner=conversation.owner,
        conversation=conversation,
        spec=spec,
        input=input,
        workflow=workflow,
        deadline=deadline,
        webhook_url=webhook_url,
    )
    with transaction.atomic():
        run, admission = start_conversation_run(conversation=conversation, on_active=on_active, new=new)
        message = Message.objects.create(
            conversation=conversation, role=MessageRole.USER, content=input["content"], run=run
        )
    return message, admission


def first_skill(node: Any) -> str | None:
    """The skill of the step that runs before any other in ``node`` (a chain's first, however nested), if one does."""
    if isinstance(node, dict) and isinstance(node.get("skill"), str):
        return str(node["skill"])
    if isinstance(node, dict) and isinstance(node.get("chain"), list) and node["chain"]:
        return first_skill(node["chain"][0])
    return None  # a group's or chord's members start together: none of them runs first


def masked_at_intake(spec: Any, input: dict[str, Any]) -> dict[str, Any]:
    """``input`` masked as its run's first step, ``mask_pii``, would mask it; as it is otherwise."""
    if first_skill(spec) != "mask_pii":
        return input
    return pii.masked_ticket(input)


def workflows_of(owner: Any) -> QuerySet[Workflow]:
    """The workflows ``owner`` may run: their own and the shared ones (``None``: the shared ones)."""
    return Workflow.objects.filter(Q(owner=owner) | Q(owner__isnull=True))


def find_workflow(name: str, owner: Any) -> Workflow | None:
    """The workflow ``name`` means to ``owner``: their own of that name, else the shared one."""
    # Own first: a shared workflow named later in the admin does not change what a user's name runs.
    return workflows_of(owner).filter(name=name).order_by(F("owner").asc(nulls_last=True)).first()


def default_workflow(owner: Any) -> Workflow | None:
    return find_workflow(settings.DEFAULT_WORKFLOW, owner)


def enqueue(run_id: int, spec: Any, input: Any, steps: dict[str, canvas.StepOptions]) -> None:
    """Publish the run's canvas.

    A broker outage leaves the run queued for the sweeper; any other error
    (a bug) fails the run and propagates.
    """
    try:
        canvas.build(spec, steps, run_id).apply_async(args=(input,))
    except BrokerUnavailable as exc:
        log.warning("run %s not published, the sweeper will: %s", run_id, exc)
        state.mark_unpublished(run_id, f"the task broker is unavailable: {exc}")
    except Exception as exc:
        log.exception("could not enqueue run %s", run_id)
        state.fail_run(run_id, f"could not enqueue: {exc}")
        raise


def publish(run: Run) -> None:
    """Publish an existing run's canvas again (replay, sweeper)."""
    planned = plan(run.spec)
    rows = {path: (pk, str(task_id)) for pk, path, task_id in run.steps.values_list("pk", "path", "task_id")}
    budget = Deadline.of_run(run.created_at, run.deadline).as_kwarg()
    options = {p.path: canvas.StepOptions.for_step(p, *rows[p.path], budget) for p in planned}
    enqueue(run.pk, run.spec, run.input, options)


def _step_row(run: Run, p: PlannedStep) -> Step:
    return Step(
        run=run,
        key=p.key,
        path=p.path,
        skill=p.skill,
        args=p.args,
        optional=p.optional,
        soft_time_limit=p.soft_time_limit,
        time_limit=p.time_limit,
        ttl=p.ttl,
        retries=p.retries,
        queue=p.queue,
    )


# --- Idempotency keys -----------------------------------------------------------


@dataclass(frozen=True)
class Idempotent:
    run: Run
    replayed: bool  # True: an earlier request with this key made the run


class KeyReused(Exception):
    """The Idempotency-Key was first used for a different request."""


def request_fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def once_per_key(owner: Any, key: str, fingerprint: str, create: Callable[[], Run]) -> Idempotent:
    """Run ``create`` unless this owner's key already made a run; then return that.

    Concurrent requests with one key make one run: the key row is inserted in
    the transaction that creates the run, so the unique constraint makes the
    others wait for it and then find it. Expired keys count as unused.
    """
    now = timezone.now()
    with transaction.atomic():
        found = _live_key(owner, key, now)
        if found is None:
            IdempotencyKey.objects.filter(owner=owner, key=key, expires_at__lte=now).delete()
            expires = now + timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL)
            try:
                with transaction.atomic():
                    record = IdempotencyKey.objects.create(
                        owner=owner, key=key, fingerprint=fingerprint, expires_at=expires
                    )
            except IntegrityError:
                found = _live_key(owner, key, now)  # a concurrent request just made it
            else:
                record.run = create()
                record.save(update_fields=["run"])
                return Idempotent(run=record.run, replayed=False)
    if found is None or found.run is None:
        raise KeyReused("this Idempotency-Key's first request is still being processed; retry shortly")
    if found.fingerprint != fingerprint:
        raise KeyReused("this Idempotency-Key was already used for a different request")
    return Idempotent(run=found.run, replayed=True)


def _live_key(owner: Any, key: str, now: datetime) -> IdempotencyKey | None:
    keys = IdempotencyKey.objects.select_related("run", "run__workflow")
    return keys.filter(owner=owner, key=key, expires_at__gt=now).first()


# --- Cancel and replay ---------------------------------------------------------------


def cancel_run(run: Run, by: str) -> None:
    """Cancel an active run: its steps are revoked, running ones terminated."""
    task_ids = state.cancel_run(run.pk, f"cancelled by {by}")
    if task_ids is None:
        current = Run.objects.values_list("status", flat=True).get(pk=run.pk)
        raise Conflict(f"run {run.pk} is already {current}; only a queued, running or waiting run can be cancelled")
    transaction.on_commit(lambda: revoke(task_ids))


def replay_run(run: Run) -> None:
    """Replay a failed or cancelled run from its unfinished steps.

    Steps that succeeded keep their outputs and are not run again; the run
    gets a fresh deadline of the length it had.
    """
    if run.status not in state.REPLAYABLE_RUN_STATUSES:
        raise Conflict(f"run {run.pk} is {run.status}; only a failed or cancelled run can be retried")
    if run.compensation == Compensation.RUNNING:
        raise Conflict(f"run {run.pk} is being rolled back (compensation running); retry it once that ended")
    try:
        plan(run.spec)
    except SpecError as exc:
        raise Conflict(f"run {run.pk} cannot be replayed: its spec is no longer valid: {exc}") from exc
    length = run.deadline - run.created_at
    if not state.replay_run(run.pk, timezone.now() + length):
        raise Conflict(f"run {run.pk} changed meanwhile; reload it")
    transaction.on_commit(lambda: publish(Run.objects.get(pk=run.pk)))


def resume_waiting_run(run: Run, payload: Any, by: str, step_id: int | None = None) -> str:
    """Answer a waiting run: its waiting step succeeds with ``payload`` and the run goes on; that step's key.

    ``step_id``: that waiting step (the sweeper's timeouts), else the first
    that waits. The canvas is published again once committed, as after a
    replay: finished steps pass their stored outputs on, so execution goes
    on after the step. Raises Conflict if the run is not waiting.
    """
    final = canvas.final_steps(run.spec, ROOT)
    key = state.resume_waiting(run.pk, payload, by, final, step_id)
    if key is None:
        current = Run.objects.values_list("status", flat=True).get(pk=run.pk)
        raise Conflict(f"run {run.pk} is {current}; only a waiting run can be resumed")
    if Run.objects.filter(pk=run.pk, status__in=ACTIVE_RUN_STATUSES).exists():
        transaction.on_commit(lambda: publish(Run.objects.get(pk=run.pk)))
    return key


def revoke(task_ids: list[str]) -> None:
    """Drop queued messages of these tasks and terminate them where running.

    Best effort: a step that still arrives finds its run ended and stops.
    """
    if not task_ids:
        return
    try:
        app.control.revoke(task_ids, terminate=True, signal="SIGTERM")
    except BrokerUnavailable as exc:
        log.warning("could not revoke %d tasks: %s", len(task_ids), exc)


# --- The sweeper ---------------------------------------------------------------------


@dataclass(frozen=True)
class SweepReport:
    expired: list[int]
    resumed: list[int]
    keys_purged: int
    webhooks_resumed: list[int]
    waits_timed_out: list[int]
    released: list[int]


def sweep() -> SweepReport:
    """Fail overdue runs, time out waits, resume stalled runs and lost webhook deliveries, forget expired keys.

    Also releases held runs whose predecessor ended without releasing them.
    """
    now = timezone.now()
    return SweepReport(
        expired=expire_overdue(now),
        waits_timed_out=time_out_waits(now),
        resumed=resume_stalled(now),
        keys_purged=purge_keys(now),
        webhooks_resumed=webhooks.resume_lost(now),
        released=double_texting.release_orphans(SWEEP_BATCH),
    )


def expire_overdue(now: datetime) -> list[int]:
    """Fail active runs past their deadline; not held ones, whose deadline starts over when released."""
    overdue = Run.objects.filter(status__in=ACTIVE_RUN_STATUSES, deadline__lt=now, waiting_for__isnull=True)
    expired = []
    for run_id in overdue.values_list("pk", flat=True)[:SWEEP_BATCH]:
        task_ids = state.expire_run(run_id)
        if task_ids is not None:
            revoke(task_ids)
            expired.append(run_id)
    return expired


def stalled_runs(now: datetime) -> Any:
    """Active runs none of whose steps was accounted for in RUN_STALL_AFTER.

    Their messages were lost (a broker restart, a publish that failed or never
    happened, a worker killed with its messages): nothing will move them.
    A run waiting for input is not stalled, nor one held behind another
    (double-texting: release_orphans publishes it if its release was lost).
    """
    cutoff = now - timedelta(seconds=settings.RUN_STALL_AFTER)
    busy = Step.objects.filter(run=OuterRef("pk"), lease_until__gt=cutoff)
    runs = Run.objects.filter(
        status__in=(RunStatus.QUEUED, RunStatus.RUNNING), deadline__gte=now, waiting_for__isnull=True
    )
    runs = runs.alias(kicked=Coalesce("republished_at", "created_at")).filter(kicked__lt=cutoff)
    return runs.exclude(Exists(busy))


def resume_stalled(now: datetime) -> list[int]:
    resumed = []
    for run in stalled_runs(now)[:SWEEP_BATCH]:
        if not state.resume_run(run.pk):
            continue
        try:
            publish(run)
        except SpecError as exc:
            state.fail_run(run.pk, f"cannot resume: its spec is no longer valid: {exc}")
            continue
        resumed.append(run.pk)
    return resumed


def time_out_waits(now: datetime) -> list[int]:
    """Waiting steps past their timeout: resumed with their declared default, else timed out (failing their run).

    The ids of the runs they were in. A wait's timeout is capped by its run's
    deadline, and expire_overdue runs first: at the deadline the run fails,
    default or not.
    """
    due = Step.objects.filter(
        run__status=RunStatus.WAITING, status=StepStatus.RUNNING, wait__isnull=False, lease_until__lt=now
    )
    timed_out = []
    for step_id, run_id, found in due.values_list("pk", "run_id", "wait")[:SWEEP_BATCH]:
        wait: dict[str, Any] = found or {}
        if "default" in wait:
            try:
                resume_waiting_run(Run.objects.get(pk=run_id), wait["default"], by="timeout", step_id=step_id)
            except Conflict:
                continue  # resumed or ended meanwhile
        else:
            timeout = wait.get("timeout")
            error = "no input by the run's deadline" if timeout is None else f"no input within {timeout:g}s"
            if not state.fail_step(step_id, error, StepStatus.TIMED_OUT):
                continue
        timed_out.append(run_id)
    return timed_out


def purge_keys(now: datetime) -> int:
    deleted, _ = IdempotencyKey.objects.filter(expires_at__lte=now).delete()
    return deleted
