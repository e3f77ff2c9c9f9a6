"""Serializers: validation lives here, views stay thin."""

from __future__ import annotations

import copy
import json
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import relations, serializers

from agentsite import outbound
from orchestration.models import Conversation, Message, OnActive, Run, RunStatus, Step, StepStatus, Workflow
from orchestration.services import find_workflow, workflows_of
from orchestration.spec import SpecError, plan


def reject_unstorable(value: Any, path: str = "") -> None:
    """Refuse, naming where, a string a database cannot store: one with U+0000 (PostgreSQL's text and jsonb
    cannot hold it) or an unpaired surrogate (JSON may escape one, but no UTF-8 encodes it).
    """
    if isinstance(value, str):
        where = path or "value"
        if "\x00" in value:
            raise serializers.ValidationError(f"{where}: strings must not contain the NUL character")
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                surrogate = ord(value[exc.start])
                raise serializers.ValidationError(
                    f"{where}: strings must not contain an unpaired surrogate (U+{surrogate:X})"
                ) from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_unstorable(key, path)
            reject_unstorable(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            reject_unstorable(item, f"{path}[{index}]")


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON: what a limit on stored JSON counts."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def reject_larger_than(value: Any, limit: int, path: str) -> None:
    size = json_size(value)
    if size > limit:
        raise serializers.ValidationError(f"{path}: {size} bytes of JSON, more than the limit of {limit} bytes")


def validate_spec(spec: Any) -> Any:
    reject_unstorable(spec, "spec")  # first: the size is counted in UTF-8
    reject_larger_than(spec, settings.SPEC_MAX_BYTES, "spec")
    try:
        plan(spec)
    except SpecError as exc:
        raise serializers.ValidationError(str(exc)) from exc
    return spec


class SpecField(serializers.JSONField):
    default_validators = [validate_spec]


def validate_input(value: Any) -> Any:
    reject_unstorable(value, "input")  # first: the size is counted in UTF-8
    reject_larger_than(value, settings.RUN_INPUT_MAX_BYTES, "input")
    return value


class InputField(serializers.JSONField):
    default_validators = [validate_input]


class BreakerSerializer(serializers.Serializer):
    state = serializers.ChoiceField(
        choices=["closed", "open", "half_open", "unknown"],
        help_text="open: steps fail (or, optional, are skipped) without calling the skill; "
        "half_open: the next call is a trial; unknown: Redis did not answer.",
    )
    failures = serializers.IntegerField(help_text="Consecutive failed attempts counted.")
    fail_max = serializers.IntegerField(help_text="The circuit opens at this many consecutive failed attempts.")
    reset_timeout = serializers.FloatField(help_text="Seconds it stays open before a trial call.")
    opened_at = serializers.DateTimeField(allow_null=True, help_text="When it last opened; null while closed.")


class SkillSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    queue = serializers.CharField()
    soft_time_limit = serializers.FloatField()
    time_limit = serializers.FloatField()
    max_soft_time_limit = serializers.FloatField()
    max_time_limit = serializers.FloatField()
    retries = serializers.IntegerField()
    backoff = serializers.FloatField()
    backoff_max = serializers.FloatField()
    optional = serializers.BooleanField()
    cache_ttl = serializers.FloatField(
        allow_null=True, help_text="Seconds a successful output is reused for the same input and args; null: never."
    )
    fallback = serializers.JSONField(help_text="The output of a skipped (optional) step of this skill.")
    breaker = serializers.SerializerMethodField(help_text="Its circuit breaker, shared by all workers; null: none.")
    compensate = serializers.CharField(
        allow_null=True, help_text="The skill that undoes its step when the run fails (saga); null: none."
    )

    @extend_schema_field(BreakerSerializer(allow_null=True))
    def get_breaker(self, skill: Any) -> dict[str, Any] | None:
        """From ``context["breakers"]`` (skills.breakers.states, read once for the whole list)."""
        return self.context.get("breakers", {}).get(skill.name)


def deadline_field(**kwargs: Any) -> serializers.FloatField:
    return serializers.FloatField(
        min_value=1,
        max_value=settings.RUN_MAX_DEADLINE,
        help_text="Seconds the run may take from its creation; past it, the run fails.",
        **kwargs,
    )


def check_webhook_url(url: str) -> None:
    """A webhook URL this server may call (agentsite.outbound), when webhooks are on."""
    if url and not settings.WEBHOOK_SECRET:
        raise serializers.ValidationError("webhooks are not enabled on this server (WEBHOOK_SECRET is not set)")
    if url:
        try:
            outbound.check_url(url)
        except outbound.UnsafeURL as exc:
            raise serializers.ValidationError(str(exc)) from exc


def webhook_field(**kwargs: Any) -> serializers.URLField:
    return serializers.URLField(max_length=2000, validators=[check_webhook_url], **kwargs)


WORKFLOW_NAME_TAKEN = "workflow with this name already exists."


class WorkflowSerializer(serializers.ModelSerializer):
    name = serializers.SlugField(max_length=100)
    spec = SpecField()
    shared = serializers.SerializerMethodField()
    owner: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        help_text="Its owner's username; null for a shared workflow.",
    )
    deadline = deadline_field(required=False, allow_null=True)
    webhook_url = webhook_field(required=False, allow_blank=True)

    class Meta:
        model = Workflow
        fields = [
            "name",
            "description",
            "spec",
            "deadline",
            "webhook_url",
            "on_active",
            "shared",
            "owner",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]
        validators: list[Any] = []  # the name's uniqueness depends on the owner: validate_name

    def get_shared(self, workflow: Workflow) -> bool:
        return workflow.owner_id is None

    def validate_name(self, name: str) -> str:
        """Unique among the names its owner sees (their own workflows' and the shared ones').

        Another user's names do not count, so a refusal tells nothing about other users.
        """
        owner = self.instance.owner if self.instance is not None else self.context["request"].user
        taken = workflows_of(owner).filter(name=name)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise serializers.ValidationError(WORKFLOW_NAME_TAKEN)
        return name


class ConversationSerializer(serializers.ModelSerializer):
    webhook_url = webhook_field(required=False, allow_blank=True)

    class Meta:
        model = Conversation
        fields = ["id", "title", "state", "webhook_url", "created_at", "updated_at"]
        read_only_fields = ["id", "state", "created_at", "updated_at"]


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = Step
        fields = [
            "id",
            "key",
            "path",
            "skill",
            "args",
            "status",
            "optional",
            "output",
            "error",
            "attempts",
            "redeliveries",
            "retries",
            "queue",
            "soft_time_limit",
            "time_limit",
            "ttl",
            "task_id",
            "cached",
            "wait",
            "compensates",
            "started_at",
            "finished_at",
            "duration_ms",
        ]


# Fields that bind other fields to themselves: a copy needs copies of those.
_WITH_CHILDREN = (serializers.BaseSerializer, serializers.ListField, serializers.DictField, relations.ManyRelatedField)


class FieldsBuiltOnce(serializers.Serializer):
    """A serializer whose fields are built once per process (DRF builds them per instance), then copied per instance:
    a field shallowly (binding sets attributes of the copy only), a nested serializer or a field with a child field
    deeply, as DRF copies declared fields. Why: docs/performance.md, "Where the time goes" (The web).
    """

    _built: dict[type, dict[str, Any]] = {}

    def get_fields(self) -> dict[str, Any]:
        built = self._built.get(type(self))
        if built is None:
            built = self._built[type(self)] = super().get_fields()
        return {
            name: copy.deepcopy(field) if isinstance(field, _WITH_CHILDREN) else copy.copy(field)
            for name, field in built.items()
        }


class RunSerializer(FieldsBuiltOnce, serializers.ModelSerializer):
    workflow: serializers.SlugRelatedField[Workflow] = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Run
        fields = [
            "id",
            "conversation",
            "workflow",
            "status",
            "input",
            "output",
            "error",
            "created_at",
            "started_at",
            "finished_at",
            "duration_ms",
            "deadline",
            "replays",
            "webhook_url",
            "trace_id",
            "waiting_for",
        ]
        read_only_fields = ["trace_id", "waiting_for"]


class AwaitingInputSerializer(serializers.Serializer):
    step = serializers.CharField(help_text="The key of the step that waits.")
    prompt = serializers.CharField()
    timeout_at = serializers.DateTimeField(help_text="When the wait times out (at the latest the run's deadline).")
    default = serializers.JSONField(required=False, help_text="Its output if it times out; absent: it fails.")


class RunDetailSerializer(RunSerializer):
    steps = StepSerializer(many=True, read_only=True)
    awaiting_input = serializers.SerializerMethodField()

    class Meta(RunSerializer.Meta):
        fields = [*RunSerializer.Meta.fields, "awaiting_input", "compensation", "spec", "steps"]

    @extend_schema_field(AwaitingInputSerializer(allow_null=True))
    def get_awaiting_input(self, run: Run) -> dict[str, Any] | None:
        """What the run waits for (its first waiting step), null unless it is waiting."""
        if run.status != RunStatus.WAITING:
            return None
        for step in run.steps.all():  # prefetched
            if step.status == StepStatus.RUNNING and step.wait is not None:
                wait = {k: v for k, v in step.wait.items() if k in ("prompt", "timeout_at", "default")}
                return {"step": step.key, **wait}
        return None


class ResumeSerializer(serializers.Serializer):
    payload = InputField(allow_null=True, help_text="Any JSON: the waiting step's output.")


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ["id", "role", "content", "run", "created_at"]


class WorkflowChoiceMixin(FieldsBuiltOnce):
    """``workflow`` (a name) or ``spec``: at most one; neither means the default."""

    workflow = serializers.SlugField(required=False)
    spec = SpecField(required=False)
    deadline = deadline_field(required=False)
    webhook = webhook_field(required=False, help_text="POST a CloudEvent here when the run ends.")
    on_active = serializers.ChoiceField(
        choices=OnActive.choices,
        required=False,
        help_text="If the conversation has an active run: reject (409), enqueue (start after it), interrupt "
        "(cancel it, start now) or allow (start now beside it). Default: the workflow's, else enqueue.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "workflow" in attrs and "spec" in attrs:
            raise serializers.ValidationError({"spec": "give either workflow or spec, not both"})
        name = attrs.pop("workflow", None)
        if name is not None:
            workflow = find_workflow(name, self.context["workflow_owner"])
            if workflow is None:
                raise serializers.ValidationError({"workflow": f'unknown workflow "{name}"'})
            attrs["workflow_obj"] = workflow
        return attrs


class PostMessageSerializer(WorkflowChoiceMixin):
    content = serializers.CharField(max_length=settings.MESSAGE_MAX_CHARS)


class StartRunSerializer(WorkflowChoiceMixin):
    input = InputField(required=False, default=None, allow_null=True)


class AdmissionSerializer(serializers.Serializer):
    """What the double-texting policy did with the new run (orchestration.double_texting)."""

    policy = serializers.ChoiceField(choices=OnActive.choices)
    outcome = serializers.ChoiceField(choices=["started", "enqueued", "interrupted"])
    waiting_for = serializers.IntegerField(allow_null=True, help_text="enqueued: the run it starts after.")
    interrupted = serializers.ListField(child=serializers.IntegerField(), help_text="The runs it cancelled.")


class MessageAcceptedSerializer(serializers.Serializer):
    message = MessageSerializer()
    run = RunSerializer()
    on_active = AdmissionSerializer()


class RunAcceptedSerializer(RunSerializer):
    on_active = AdmissionSerializer(read_only=True)

    class Meta(RunSerializer.Meta):
        fields = [*RunSerializer.Meta.fields, "on_active"]


class ActiveRunConflictSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What is wrong.")
    active_run = serializers.IntegerField(help_text="The conversation's active run.")


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What is wrong.")
