"""Double-texting: what a new run of a conversation does while another is active (``OnActive``).

``reject`` refuses it, ``enqueue`` holds it until the runs before it ended,
``interrupt`` cancels them, ``allow`` starts it beside them. docs/design.md,
"Double-texting", says how each is decided and released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction

from . import broker, transitions
from .models import ACTIVE_RUN_STATUSES, Conversation, OnActive, Run, RunEvent, RunStatus
from .spec import SpecError
from .transitions import RunEnded

log = logging.getLogger(__name__)


class Busy(Exception):
    """``reject``: the conversation has an active run."""

    def __init__(self, conversation_id: int, run_id: int) -> None:
        self.run_id = run_id
        super().__init__(
            f"conversation {conversation_id} has an active run ({run_id}); "
            "on_active=reject refuses a new run until it ends"
        )


@dataclass(frozen=True)
class Admission:
    """How a new run was let in: its policy, and what that did."""

    policy: str
    waiting_for: int | None = None  # enqueue: the run it is held behind
    interrupted: list[int] = field(default_factory=list)  # interrupt: the runs it cancelled

    @property
    def outcome(self) -> str:
        if self.waiting_for is not None:
            return "enqueued"
        return "interrupted" if self.interrupted else "started"

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "outcome": self.outcome,
            "waiting_for": self.waiting_for,
            "interrupted": self.interrupted,
        }


def policy_for(requested: str | None, workflow: Any) -> str:
    """The request's policy, else the workflow's, else ``enqueue``."""
    return requested or (workflow.on_active if workflow is not None else None) or OnActive.ENQUEUE


def admit(conversation: Conversation, policy: str) -> Admission:
    """Decide how a new run of ``conversation`` starts; call inside the transaction that creates it.

    Raises Busy (``reject``); for ``interrupt``, ``apply`` cancels the runs once the new one exists.
    """
    if policy == OnActive.ALLOW:
        return Admission(policy)
    active = _lock_active_runs(conversation)
    if not active:
        return Admission(policy)
    if policy == OnActive.REJECT:
        published = [pk for pk, waiting_for in active if waiting_for is None]
        raise Busy(conversation.pk, (published or [active[0][0]])[0])
    if policy == OnActive.INTERRUPT:
        return Admission(policy, interrupted=[pk for pk, _ in active])
    return Admission(policy, waiting_for=active[-1][0])


def _lock_active_runs(conversation: Conversation) -> list[tuple[int, int | None]]:
    """Lock the conversation's row, then its active runs; their (id, waiting_for) oldest first."""
    # NO KEY UPDATE: a worker inserting a reply (a foreign key to the conversation) or an event does not wait.
    if connection.features.has_select_for_update:  # SQLite: BEGIN IMMEDIATE took the database's write lock
        Conversation.objects.select_for_update(no_key=True).filter(pk=conversation.pk).values_list("pk").first()
    runs = Run.objects.filter(conversation=conversation, status__in=ACTIVE_RUN_STATUSES).order_by("pk")
    return list(runs.select_for_update(no_key=True).values_list("pk", "waiting_for_id"))


def apply(run: Run, admission: Admission) -> None:
    """Record the new run's interruption of the conversation's active runs (cancelled, their steps revoked)."""
    if not admission.interrupted:
        return
    transitions.record(run.pk, "run.interrupting", cancelled=admission.interrupted)
    for run_id in admission.interrupted:
        transitions.record(run_id, "run.interrupted", by_run=run.pk)
        broker.revoke_on_commit(transitions.cancel_run(run_id, f"interrupted by run {run.pk} (on_active=interrupt)"))


def admission_of(run: Run, policy: str) -> Admission:
    """The admission a run had under ``policy``, from its events (an idempotent repeat of its request)."""
    types = ("run.enqueued", "run.interrupting")
    found = dict(RunEvent.objects.filter(run=run, type__in=types).values_list("type", "data")[:2])
    waiting_for = found.get("run.enqueued", {}).get("waiting_for")
    return Admission(
        policy, waiting_for=waiting_for, interrupted=found.get("run.interrupting", {}).get("cancelled", [])
    )


def release_after(ended_id: int) -> int | None:
    """Run ``ended_id`` ended: publish the run held behind it, if any; its id.

    If the ended run was itself held, the run behind it waits for the one it waited for, while that is active.
    """
    # Called only for a run something was held behind (Run.followed) or an orphan's predecessor.
    follower = Run.objects.filter(waiting_for_id=ended_id, status=RunStatus.QUEUED).values_list("pk", flat=True)
    with transaction.atomic():
        follower_id = follower.first()
        if follower_id is None:
            return None
        ahead = Run.objects.filter(pk=ended_id).values_list("waiting_for_id", flat=True).first()
        if ahead is not None and _still_active(ahead):
            transitions.move_up(follower_id, ended_id, ahead)
            return None
        if not transitions.release_run(follower_id, ended_id):
            return None  # released by another caller meanwhile
    run = Run.objects.get(pk=follower_id)
    try:
        broker.republish(run)
    except SpecError as exc:
        transitions.fail_run(run.pk, f"cannot start: its spec is no longer valid: {exc}")
    return follower_id


def _still_active(run_id: int) -> bool:
    runs = Run.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES)
    if connection.features.has_select_for_update:  # its end, if under way, commits first
        runs = runs.select_for_update(no_key=True)
    return runs.values_list("pk").first() is not None


def on_run_ended(sender: Any, run: RunEnded, **kwargs: Any) -> None:
    """transitions.run_ended: once committed, the run held behind it starts (if that fails, the sweeper's)."""
    if run.followed:
        transaction.on_commit(lambda: release_after(run.id), robust=True)


def release_orphans(limit: int) -> list[int]:
    """Release held runs whose predecessor ended but did not release them (a crash in between)."""
    orphans = Run.objects.filter(status=RunStatus.QUEUED, waiting_for__isnull=False).exclude(
        waiting_for__status__in=ACTIVE_RUN_STATUSES
    )
    released = []
    for ended_id in orphans.values_list("waiting_for_id", flat=True)[:limit]:
        run_id = release_after(ended_id)
        if run_id is not None:
            released.append(run_id)
    return released
