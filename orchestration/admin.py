from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from . import services
from .models import (
    Conversation,
    IdempotencyKey,
    Message,
    Run,
    RunEvent,
    RunStatus,
    Step,
    StepStatus,
    WebhookDelivery,
    Workflow,
)


class MessageInline(admin.TabularInline):
    model = Message
    fields = ["role", "content", "run", "created_at"]
    readonly_fields = ["created_at"]
    raw_id_fields = ["run"]
    extra = 0


# Webhook URLs typed without a scheme are taken as https (Django 6's default, said now).
WEBHOOK_URL_FIELDS: Mapping[type[models.Field[Any, Any]], Mapping[str, Any]] = {
    models.URLField: {"assume_scheme": "https"}
}


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    formfield_overrides = WEBHOOK_URL_FIELDS
    list_display = ["id", "title", "owner", "created_at", "updated_at"]
    search_fields = ["=id", "title", "owner__username"]
    raw_id_fields = ["owner"]
    inlines = [MessageInline]


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    formfield_overrides = WEBHOOK_URL_FIELDS
    list_display = ["name", "owner", "updated_at"]
    search_fields = ["name", "description"]
    raw_id_fields = ["owner"]


class StepInline(admin.TabularInline):
    model = Step
    fields = ("key", "skill", "status", "attempts", "redeliveries", "cached", "duration_ms", "error", "output", "task")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        return False

    @admin.display(description="Celery task")
    def task(self, step: Step) -> str:
        """The step's task in Flower (its latest attempt; a replay gives the step a new task id)."""
        return format_html(
            '<a href="{}task/{}" target="_blank">{}</a>', settings.FLOWER_URL, step.task_id, step.task_id
        )


class WebhookDeliveryInline(admin.TabularInline):
    model = WebhookDelivery
    fields = readonly_fields = ("url", "event_id", "status", "attempts", "response_status", "error", "delivered_at")
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    formfield_overrides = WEBHOOK_URL_FIELDS
    list_display = ["id", "owner", "workflow", "status", "created_at", "duration_ms", "error", "trace_id"]
    list_filter = ["status", "workflow", "steps__skill"]
    search_fields = ["=id", "=conversation__id", "owner__username", "error", "=trace_id"]
    raw_id_fields = ["owner", "conversation", "workflow"]
    readonly_fields = [
        "created_at",
        "started_at",
        "finished_at",
        "duration_ms",
        "replays",
        "republished_at",
        "trace_id",
        "awaiting_input",
        "waiting_for",  # set and cleared by double-texting only
    ]
    date_hierarchy = "created_at"
    inlines = [StepInline, WebhookDeliveryInline]
    actions = ["cancel_runs", "replay_runs"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        return super().get_queryset(request).select_related("owner", "workflow")

    def get_urls(self) -> list[URLPattern]:
        resume = path("<int:run_id>/resume/", self.admin_site.admin_view(self.resume_view), name=RESUME_URL)
        return [resume, *super().get_urls()]

    @admin.display(description="Awaiting input")
    def awaiting_input(self, run: Run) -> str:
        """The prompt of a waiting run, with a link to answer it."""
        wait = waiting_step(run)
        if wait is None:
            return "-"
        link = reverse(f"admin:{RESUME_URL}", args=[run.pk])
        return format_html('{}: "{}" <a href="{}">Resume&hellip;</a>', wait["step"], wait["prompt"], link)

    def resume_view(self, request: HttpRequest, run_id: int) -> HttpResponse:
        """A form for a JSON payload that resumes a waiting run (as POST /api/runs/{id}/resume/)."""
        run = get_object_or_404(Run, pk=run_id)
        if not self.has_change_permission(request, run):
            raise PermissionDenied
        form = ResumeForm(request.POST if request.method == "POST" else None)
        if form.is_valid():
            try:
                key = services.resume_waiting_run(run, form.cleaned_data["payload"], by=request.user.get_username())
            except services.Conflict as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                self.message_user(request, f"Run {run.pk} resumed: step {key} got the payload.", messages.SUCCESS)
            return redirect("admin:orchestration_run_change", run.pk)
        context = {**self.admin_site.each_context(request), "opts": self.opts, "run": run, "form": form}
        context["awaiting_input"] = waiting_step(run)
        return TemplateResponse(request, "admin/orchestration/run/resume.html", context)

    @admin.action(description="Cancel selected runs")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        by = request.user.get_username()
        self._apply(request, queryset, "cancelled", lambda run: services.cancel_run(run, by=by))

    @admin.action(description="Replay selected failed or cancelled runs")
    def replay_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        self._apply(request, queryset, "replayed", services.replay_run)

    def _apply(self, request: HttpRequest, queryset: QuerySet[Run], done: str, action: Callable[[Run], None]) -> None:
        """Apply an action to each run; report how many it applied to and why not the rest."""
        applied, refused = 0, []
        for run in queryset:
            try:
                action(run)
            except services.Conflict as exc:
                refused.append(str(exc))
            else:
                applied += 1
        self.message_user(request, f"{applied} run(s) {done}.", messages.SUCCESS)
        for reason in refused[:10]:
            self.message_user(request, reason, messages.WARNING)
        if len(refused) > 10:
            self.message_user(request, f"... and {len(refused) - 10} more not {done}.", messages.WARNING)


RESUME_URL = "orchestration_run_resume"


class ResumeForm(forms.Form):
    payload = forms.JSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 6, "cols": 60}),
        help_text='Any JSON, e.g. {"approved": true}: the waiting step\'s output. Empty: null.',
    )


def waiting_step(run: Run) -> dict[str, Any] | None:
    """The step a waiting run waits on: its key, prompt and timeout; None unless the run waits."""
    if run.status != RunStatus.WAITING:
        return None
    step = run.steps.filter(status=StepStatus.RUNNING, wait__isnull=False).order_by("id").first()
    if step is None or step.wait is None:
        return None
    return {"step": step.key, "prompt": step.wait["prompt"], "timeout_at": step.wait.get("timeout_at")}


@admin.register(Step)
class StepAdmin(admin.ModelAdmin):
    list_display = ["id", "run", "key", "skill", "status", "attempts", "redeliveries", "duration_ms", "started_at"]
    list_filter = ["status", "skill", "optional", "cached"]
    search_fields = ["=id", "=run__id", "key", "=task_id"]
    raw_id_fields = ["run"]
    readonly_fields = ["duration_ms"]


@admin.register(RunEvent)
class RunEventAdmin(admin.ModelAdmin):
    list_display = ["id", "run", "seq", "type", "step", "created_at"]
    list_filter = ["type"]
    search_fields = ["=run__id"]
    raw_id_fields = ["run", "step"]


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(admin.ModelAdmin):
    list_display = ["key", "owner", "run", "created_at", "expires_at"]
    search_fields = ["key", "owner__username", "=run__id"]
    raw_id_fields = ["owner", "run"]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    formfield_overrides = WEBHOOK_URL_FIELDS
    list_display = ["id", "run", "event_id", "status", "attempts", "response_status", "next_attempt_at", "delivered_at"]
    list_filter = ["status"]
    search_fields = ["=run__id", "event_id", "url"]
    raw_id_fields = ["run"]
    readonly_fields = ["event_id", "body", "attempts", "response_status", "error", "created_at", "delivered_at"]
