"""Conversations, workflows, runs and their steps: the source of truth.

Celery carries work and intermediate values; these rows say what happened.
Status changes go through ``orchestration.transitions``, which writes a
RunEvent for each in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, models
from django.utils import timezone
from django_celery_results.managers import TaskResultManager
from django_celery_results.models import TaskResult


class Conversation(models.Model):
    # No index of its own (one fewer to update per write): conversation_owner_list_idx leads with it.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, models.CASCADE, related_name="conversations", db_index=False)
    title = models.CharField(max_length=200, blank=True)
    state = models.JSONField(default=dict, blank=True)
    webhook_url = models.URLField(
        max_length=2000,
        blank=True,
        help_text="Where a CloudEvent is POSTed when a run ends (a run's own, else its workflow's, else this).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # GET /api/conversations/: a user's conversations, newest first.
            models.Index(fields=["owner", "-id"], name="conversation_owner_list_idx"),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class OnActive(models.TextChoices):
    """What a new run of a conversation does when the conversation has an active run (double-texting)."""

    REJECT = "reject"  # refused: 409, nothing stored
    ENQUEUE = "enqueue"  # held, and started once the runs before it ended, one at a time
    INTERRUPT = "interrupt"  # the active runs are cancelled, the new one starts at once
    ALLOW = "allow"  # started at once, alongside the active runs


class Workflow(models.Model):
    """A named, validated spec; without an owner it is shared by everyone. Names are unique per owner and among
    the shared workflows: to a user, a name means their own workflow, else the shared one (services.find_workflow).
    """

    # No index of its own: workflow_name_per_owner leads with it.
    name = models.SlugField(max_length=100, db_index=False)
    description = models.TextField(blank=True)
    spec = models.JSONField()
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, models.CASCADE, null=True, blank=True, related_name="workflows")
    deadline = models.FloatField(
        null=True, blank=True, help_text="Seconds a run may take; empty: the service default (RUN_DEFAULT_DEADLINE)."
    )
    webhook_url = models.URLField(
        max_length=2000,
        blank=True,
        help_text="Where a CloudEvent is POSTed when a run ends (a run's own, else its workflow's, else this).",
    )
    on_active = models.CharField(
        max_length=16,
        choices=OnActive.choices,
        default=OnActive.ENQUEUE,
        help_text="What a run of it does when its conversation has an active run (a request may override it).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            # Also the index of a lookup by name (the API's, a run's workflow name).
            models.UniqueConstraint(fields=["name", "owner"], name="workflow_name_per_owner"),
            # NULLs are distinct in the one above: shared names need their own.
            models.UniqueConstraint(
                fields=["name"], condition=models.Q(owner__isnull=True), name="workflow_shared_name_uniq"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_RUN_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)


class Compensation(models.TextChoices):
    """How a failed run's rollback (saga compensation, orchestration/saga.py) went; blank: none."""

    NONE = "", "none"
    RUNNING = "running"  # its compensation steps are under way, one at a time
    DONE = "done"  # every compensation succeeded: its compensable steps are compensated
    FAILED = "failed"  # at least one compensation failed (the others still ran)


def default_deadline() -> datetime:
    return timezone.now() + timedelta(seconds=settings.RUN_DEFAULT_DEADLINE)


class Run(models.Model):
    # No single-column indexes on the foreign keys (one index fewer to update per write):
    # the list indexes below lead with each of them.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, models.CASCADE, related_name="runs", db_index=False)
    conversation = models.ForeignKey(
        Conversation, models.CASCADE, null=True, blank=True, related_name="runs", db_index=False
    )
    workflow = models.ForeignKey(Workflow, models.SET_NULL, null=True, blank=True, related_name="runs", db_index=False)
    spec = models.JSONField()
    input = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(default=default_deadline, help_text="The run fails if it has not ended by then.")
    replays = models.PositiveIntegerField(default=0, help_text="How often the run was replayed after it ended.")
    republished_at = models.DateTimeField(
        null=True, blank=True, help_text="When its canvas was last published again (replay, or the sweeper)."
    )
    last_event_seq = models.PositiveIntegerField(default=0, help_text="The seq of its latest RunEvent.")
    webhook_url = models.URLField(max_length=2000, blank=True, help_text="Where a CloudEvent is POSTed when it ends.")
    # Set while the run is held (queued, not published) behind the run before it in its
    # conversation (double-texting ``enqueue``); cleared when it is released. Its index
    # serves the release (orchestration.double_texting.release_after).
    waiting_for = models.ForeignKey(
        "self",
        models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Held: the run it starts after (its conversation's run before it); empty once released.",
    )
    followed = models.BooleanField(
        default=False,
        help_text="A run was held behind it (double-texting): its end releases that run.",
    )
    # No index: the admin's search ORs it with a substring search of the error,
    # a scan anyway, and the API does not filter by it.
    compensation = models.CharField(
        max_length=8,
        choices=Compensation.choices,
        blank=True,
        default=Compensation.NONE,
        help_text="Its rollback after it failed: running, done or failed; blank when it had nothing to compensate.",
    )
    trace_id = models.CharField(
        max_length=32,
        blank=True,
        default="",
        help_text="The OpenTelemetry trace of the request that started it (32 hex digits); blank when tracing is off.",
    )

    class Meta:
        ordering = ["-id"]
        # Each index answers one GET /api/runs/ query, its filter and its newest-first order
        # (as a user, the owner filter comes first; staff see all).
        indexes = [
            # GET /api/runs/ as a user.
            models.Index(fields=["owner", "-id"], name="run_owner_list_idx"),
            # GET /api/runs/?status=... as a user.
            models.Index(fields=["owner", "status", "-id"], name="run_owner_status_idx"),
            # GET /api/runs/?status=... as staff; the admin's status filter.
            models.Index(fields=["status", "-id"], name="run_status_idx"),
            # GET /api/runs/?conversation=... (a conversation's runs are all its owner's).
            models.Index(fields=["conversation", "-id"], name="run_conversation_list_idx"),
            # GET /api/runs/?workflow__name=... as a user.
            models.Index(fields=["owner", "workflow", "-id"], name="run_owner_workflow_list_idx"),
            # GET /api/runs/?workflow__name=... as staff.
            models.Index(fields=["workflow", "-id"], name="run_workflow_list_idx"),
        ]

    def __str__(self) -> str:
        return f"Run {self.pk} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status not in ACTIVE_RUN_STATUSES

    @property
    def duration_ms(self) -> int | None:
        return _duration_ms(self.started_at, self.finished_at)


class StepStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    COMPENSATED = "compensated"


class Step(models.Model):
    """One skill invocation of a run, at one place (``path``) of its spec."""

    # No index of its own (one fewer to update per write): step_run_order_idx and
    # step_unique_key_per_run lead with it.
    run = models.ForeignKey(Run, models.CASCADE, related_name="steps", db_index=False)
    key = models.CharField(max_length=200, help_text="The spec's step id, or its path when it has none.")
    path = models.CharField(max_length=500)
    skill = models.CharField(max_length=100)
    args = models.JSONField(default=dict, blank=True)
    optional = models.BooleanField(default=False)
    soft_time_limit = models.FloatField()
    time_limit = models.FloatField()
    ttl = models.FloatField(null=True, blank=True)
    retries = models.PositiveIntegerField(default=0)
    queue = models.CharField(max_length=100)
    task_id = models.UUIDField(default=uuid.uuid4, unique=True, help_text="The Celery task id of this step.")
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    redeliveries = models.PositiveIntegerField(
        default=0, help_text="Attempts that were cut short by a lost worker and delivered again."
    )
    delivery = models.CharField(
        max_length=64, blank=True, help_text="The task message that holds this step: only it may run or replay it."
    )
    lease_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Until when the step is accounted for: its attempt's hard limit (plus grace), its retry "
        "countdown, or its finish. The sweeper resumes a run none of whose steps is accounted for.",
    )
    cached = models.BooleanField(
        default=False, help_text="It succeeded with an output from the skill result cache: the skill was not called."
    )
    wait = models.JSONField(
        null=True,
        blank=True,
        help_text="What its skill asked to wait for (prompt, timeout_at, default): the step waits while it is "
        "running with this set, and succeeds with the payload it is resumed with.",
    )
    # No index: read with its run's steps only.
    compensates = models.ForeignKey(
        "self",
        models.CASCADE,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
        help_text="A compensation step: the step of its run whose effect it undoes (orchestration/saga.py).",
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["run", "key"], name="step_unique_key_per_run")]
        indexes = [
            # GET /api/runs/{id}/: a run's steps in order, without a sort.
            models.Index(fields=["run", "id"], name="step_run_order_idx"),
            # Admin filter by skill and status.
            models.Index(fields=["skill", "status"], name="step_skill_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.skill}, {self.status})"

    @property
    def duration_ms(self) -> int | None:
        return _duration_ms(self.started_at, self.finished_at)


class RunEvent(models.Model):
    """An append-only record of one state change of a run or its steps.

    ``seq`` numbers a run's events 1, 2, 3 ... in commit order, so the event stream resumes exactly after n.
    """

    # No index of its own: the (run, seq) constraint's index leads with it.
    run = models.ForeignKey(Run, models.CASCADE, related_name="events", db_index=False)
    seq = models.PositiveIntegerField()
    step = models.ForeignKey(Step, models.CASCADE, null=True, blank=True, related_name="events")
    type = models.CharField(max_length=50)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            # GET /api/runs/{id}/events/: a run's events after a seq, in order.
            models.UniqueConstraint(fields=["run", "seq"], name="runevent_run_seq_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.type} (run {self.run_id})"


class WebhookStatus(models.TextChoices):
    PENDING = "pending", "pending"
    DELIVERED = "delivered", "delivered"
    FAILED = "failed", "failed"


class WebhookDelivery(models.Model):
    """One CloudEvent POSTed (or to be) to a run's webhook when the run ended.

    ``body`` is fixed when the run ends: every attempt sends the same bytes, with the same event id.
    """

    # No index of its own: webhook_run_idx leads with it.
    run = models.ForeignKey(Run, models.CASCADE, related_name="webhook_deliveries", db_index=False)
    url = models.URLField(max_length=2000)
    event_id = models.CharField(max_length=64, help_text="The CloudEvent's id: the same on every attempt.")
    body = models.TextField()
    status = models.CharField(max_length=10, choices=WebhookStatus.choices, default=WebhookStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    response_status = models.PositiveIntegerField(null=True, blank=True, help_text="The last attempt's HTTP status.")
    error = models.TextField(blank=True, help_text="Why the last attempt failed.")
    next_attempt_at = models.DateTimeField(help_text="When it is (re)tried; the sweeper republishes it if lost.")
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # A run's deliveries (the admin, the run's detail).
            models.Index(fields=["run", "-id"], name="webhook_run_idx"),
            # The sweeper: pending deliveries whose attempt is overdue.
            models.Index(fields=["status", "next_attempt_at"], name="webhook_due_idx"),
        ]

    def __str__(self) -> str:
        return f"Webhook {self.event_id} ({self.status})"


class IdempotencyKey(models.Model):
    """A client's Idempotency-Key: a repeat of its request returns the same run."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the request it was first used for.")
    run = models.ForeignKey(Run, models.CASCADE, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "key"], name="idempotency_key_per_owner")]
        indexes = [
            # The sweeper deletes expired keys.
            models.Index(fields=["expires_at"], name="idempotency_key_expiry_idx"),
        ]

    def __str__(self) -> str:
        return self.key


class MessageRole(models.TextChoices):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class Message(models.Model):
    # No index of its own (one fewer to update per write): message_conversation_list_idx leads with it.
    conversation = models.ForeignKey(Conversation, models.CASCADE, related_name="messages", db_index=False)
    role = models.CharField(max_length=16, choices=MessageRole.choices)
    content = models.TextField()
    run = models.ForeignKey(Run, models.SET_NULL, null=True, blank=True, related_name="messages")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # GET /api/conversations/{id}/messages/: a conversation's messages, oldest first.
            models.Index(fields=["conversation", "id"], name="message_conversation_list_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


def _duration_ms(start: Any, end: Any) -> int | None:
    if start is None or end is None:
        return None
    return int((end - start).total_seconds() * 1000)


class UpsertTaskResultManager(TaskResultManager):
    def store_result(  # type: ignore[override]
        self, content_type: str, content_encoding: str, task_id: str, result: Any, status: str, **fields: Any
    ) -> TaskResult:
        """Store a task's result in one INSERT ... ON CONFLICT DO UPDATE, not a SELECT then an INSERT or UPDATE."""
        using = fields.pop("using", None)
        # date_started: an expression (STARTED rows, which track_started=False never writes).
        if "date_started" in fields or using not in (None, DEFAULT_DB_ALIAS):
            return super().store_result(content_type, content_encoding, task_id, result, status, using=using, **fields)
        values = {"content_type": content_type, "content_encoding": content_encoding, "result": result}
        values |= {"status": status, **{name: fields.get(name) for name in UPSERT_FIELDS}}
        row = self.model(task_id=task_id, **values)
        with connection.cursor() as cursor:
            cursor.execute(_upsert_sql(), [saved_value(row, field) for field in inserted_fields(TaskResult)])
        return row


UPSERT_FIELDS = ("traceback", "meta", "periodic_task_name", "task_name", "task_args", "task_kwargs", "worker")


@cache
def _upsert_sql() -> str:
    """The INSERT of a TaskResult that updates the row of its task id, if there is one (PostgreSQL and SQLite)."""
    quote = connection.ops.quote_name
    columns = [quote(column_of(field)) for field in inserted_fields(TaskResult)]
    updated = [quote(column_of(TaskResult._meta.get_field(name))) for name in (*UPSERT_FIELDS, *_UPDATED)]
    values = ", ".join(["%s"] * len(columns))
    return (
        f"INSERT INTO {quote(TaskResult._meta.db_table)} ({', '.join(columns)}) VALUES ({values})"
        f" ON CONFLICT ({quote('task_id')}) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in updated)}"
    )


_UPDATED = ("content_type", "content_encoding", "result", "status", "date_done")


def inserted_fields(model: type[models.Model]) -> list[models.Field[Any, Any]]:
    """The columns an INSERT of ``model`` writes: all but the primary key (the database's)."""
    return [field for field in model._meta.concrete_fields if not field.primary_key]


def column_of(field: Any) -> str:
    return str(field.column)


def saved_value(instance: models.Model, field: models.Field[Any, Any]) -> Any:
    """What a save writes to ``field``'s column (its default or auto_now value set first), as a query parameter."""
    return field.get_db_prep_save(field.pre_save(instance, add=True), connection)


class StoredTaskResult(TaskResult):
    """django-celery-results' TaskResult, stored by upsert (the result backend's TaskModel)."""

    objects = UpsertTaskResultManager()

    class Meta:
        proxy = True
