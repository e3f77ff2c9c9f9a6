"""Starting, cancelling, replaying, resuming and sweeping runs.

It decides what to change; ``transitions`` changes it and ``broker`` publishes and revokes.
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

from agentsite import telemetry
from skills.registry import registry

from . import broker, canvas, double_texting, transitions, webhooks
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
from .spec import ROOT, PlannedStep, SpecError, first_skill, plan

log = logging.getLogger(__name__)

SWEEP_BATCH = 200  # runs per kind per sweep: a backlog drains over a few sweeps


class Conflict(Exception):
    """The run is not in a state that allows the action; the message says why."""


@dataclass(frozen=True)
class NewRun:
    """A run and its steps, not inserted yet (``insert_run``)."""

    run: Run
    planned: list[PlannedStep]
    steps: list[Step]


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

    ``deadline`` (seconds) and ``webhook_url`` override the workflow's, which override the defaults.
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
    )
    return NewRun(run, planned, [_step_row(p) for p in planned])


def start_run(*, waiting_for: int | None = None, **run: Any) -> Run:
    """Insert a queued run with its pending steps (``prepare_run``'s arguments); publish once committed."""
    return insert_run(prepare_run(**run), waiting_for)


def insert_run(new: NewRun, waiting_for: int | None = None) -> Run:
    """Insert the prepared run with its pending steps and publish it once committed (a broker outage: the sweeper's).

    With ``waiting_for`` the run is held, not published: it starts when that run ends (double-texting).
    """
    transitions.insert_run(new.run, new.steps, waiting_for)
    if waiting_for is None:
        broker.publish_new_run(new.run, new.planned, new.steps)
    return new.run


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

    The message passes its run's first skill's ``intake`` before it is stored (``mask_pii``: the raw text never is).
    """
    input = at_intake(spec, {"content": content, "conversation_id": conversation.pk})
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


def at_intake(spec: Any, input: dict[str, Any]) -> dict[str, Any]:
    """``input`` as the intake of the run's first skill leaves it (skills.registry.Skill.intake); else as it is."""
    name = first_skill(spec)
    skill = registry.get(name) if name else None
    return input if skill is None or skill.intake is None else skill.intake(input)


def workflows_of(owner: Any) -> QuerySet[Workflow]:
    """The workflows ``owner`` may run: their own and the shared ones (``None``: the shared ones)."""
    return Workflow.objects.filter(Q(owner=owner) | Q(owner__isnull=True))


def find_workflow(name: str, owner: Any) -> Workflow | None:
    """The workflow ``name`` means to ``owner``: their own of that name, else the shared one."""
    # Own first: a shared workflow named later in the admin does not change what a user's name runs.
    return workflows_of(owner).filter(name=name).order_by(F("owner").asc(nulls_last=True)).first()


def default_workflow(owner: Any) -> Workflow | None:
    return find_workflow(settings.DEFAULT_WORKFLOW, owner)


def _step_row(p: PlannedStep) -> Step:
    return Step(
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
    """Run ``create`` unless this owner's key already made a run; then return that (expired keys count as unused).

    The key row goes in with the run: its unique constraint makes a concurrent request wait, then find it.
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
    task_ids = transitions.cancel_run(run.pk, f"cancelled by {by}")
    if task_ids is None:
        current = Run.objects.values_list("status", flat=True).get(pk=run.pk)
        raise Conflict(f"run {run.pk} is already {current}; only a queued, running or waiting run can be cancelled")
    broker.revoke_on_commit(task_ids)


def replay_run(run: Run) -> None:
    """Replay a failed or cancelled run from its unfinished steps, with a fresh deadline of the length it had.

    Raises Conflict if it is not failed or cancelled, is being rolled back, or its spec is no longer valid.
    """
    if run.status not in transitions.REPLAYABLE_RUN_STATUSES:
        raise Conflict(f"run {run.pk} is {run.status}; only a failed or cancelled run can be retried")
    if run.compensation == Compensation.RUNNING:
        raise Conflict(f"run {run.pk} is being rolled back (compensation running); retry it once that ended")
    try:
        plan(run.spec)
    except SpecError as exc:
        raise Conflict(f"run {run.pk} cannot be replayed: its spec is no longer valid: {exc}") from exc
    length = run.deadline - run.created_at
    if not transitions.replay_run(run.pk, timezone.now() + length):
        raise Conflict(f"run {run.pk} changed meanwhile; reload it")
    transaction.on_commit(lambda: broker.republish(Run.objects.get(pk=run.pk)))


def resume_waiting_run(run: Run, payload: Any, by: str, step_id: int | None = None) -> str:
    """Answer a waiting run: its waiting step (``step_id``, else the first) succeeds with ``payload``; that step's key.

    The canvas is published again once committed, as after a replay. Raises Conflict if the run is not waiting.
    """
    final = canvas.final_steps(run.spec, ROOT)
    key = transitions.resume_waiting(run.pk, payload, by, final, step_id)
    if key is None:
        current = Run.objects.values_list("status", flat=True).get(pk=run.pk)
        raise Conflict(f"run {run.pk} is {current}; only a waiting run can be resumed")
    if Run.objects.filter(pk=run.pk, status__in=ACTIVE_RUN_STATUSES).exists():
        transaction.on_commit(lambda: broker.republish(Run.objects.get(pk=run.pk)))
    return key


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
        task_ids = transitions.expire_run(run_id)
        if task_ids is not None:
            broker.revoke(task_ids)
            expired.append(run_id)
    return expired


def stalled_runs(now: datetime) -> Any:
    """Queued or running runs none of whose steps was accounted for in RUN_STALL_AFTER: their messages were lost.

    Not a waiting run, nor a held one (release_orphans publishes that if its release was lost).
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
        if not transitions.resume_run(run.pk):
            continue
        try:
            broker.republish(run)
        except SpecError as exc:
            transitions.fail_run(run.pk, f"cannot resume: its spec is no longer valid: {exc}")
            continue
        resumed.append(run.pk)
    return resumed


def time_out_waits(now: datetime) -> list[int]:
    """Waiting steps past their timeout take their declared default, else time out (failing their run); the runs' ids.

    A wait's timeout is capped by its run's deadline, which is swept first.
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
            if not transitions.fail_step(step_id, error, StepStatus.TIMED_OUT):
                continue
        timed_out.append(run_id)
    return timed_out


def purge_keys(now: datetime) -> int:
    deleted, _ = IdempotencyKey.objects.filter(expires_at__lte=now).delete()
    return deleted
