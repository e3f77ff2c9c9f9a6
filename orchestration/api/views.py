"""REST API views.

Every queryset is filtered by owner (staff see all), so another user's object
answers 404 rather than 403: its existence is not disclosed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, PermissionDenied, ValidationError
from rest_framework.generics import GenericAPIView
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.throttling import BaseThrottle

from orchestration import double_texting, services
from orchestration.events import EventStream, NoStreamSlot
from orchestration.models import Conversation, MessageRole, Run, Workflow
from skills import breakers
from skills.registry import registry

from .schema import field_errors
from .serializers import (
    WORKFLOW_NAME_TAKEN,
    ActiveRunConflictSerializer,
    ConversationSerializer,
    ErrorSerializer,
    MessageAcceptedSerializer,
    MessageSerializer,
    PostMessageSerializer,
    ResumeSerializer,
    RunAcceptedSerializer,
    RunDetailSerializer,
    RunSerializer,
    SkillSerializer,
    StartRunSerializer,
    WorkflowSerializer,
)
from .throttling import RunCreationThrottle


def _is_staff(request: Request) -> bool:
    return bool(request.user and request.user.is_staff)


def _user(request: Request) -> User:
    """The authenticated user (every view requires authentication)."""
    return cast(User, request.user)


def visible_workflows(request: Request) -> QuerySet[Workflow]:
    """A user's own workflows and the shared ones; staff see all."""
    if _is_staff(request):
        return Workflow.objects.all()
    return services.workflows_of(_user(request))


def visible_conversations(request: Request | None) -> QuerySet[Conversation]:
    """A user's own conversations; staff see all. (No request: schema generation.)"""
    if request is None:
        return Conversation.objects.none()
    conversations = Conversation.objects.all()
    return conversations if _is_staff(request) else conversations.filter(owner=_user(request))


class OwnedMixin(GenericAPIView[Any]):
    """Filters the view's queryset to the request user's objects (staff: all)."""

    def get_queryset(self) -> QuerySet[Any]:
        queryset = super().get_queryset()
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return queryset.none()
        return queryset if _is_staff(self.request) else queryset.filter(owner=_user(self.request))


class SkillViewSet(viewsets.ViewSet):
    """The registered skills, with their queues, limits, retry policy and circuit breaker's state."""

    @extend_schema(responses=SkillSerializer(many=True))
    def list(self, request: Request) -> Response:
        skills = list(registry)
        return Response(SkillSerializer(skills, many=True, context={"breakers": breakers.states(skills)}).data)


WORKFLOW_OWNER_PARAMETER = OpenApiParameter(
    "owner", str, description="Staff only: the username whose workflow of that name is meant (default: yours)."
)


@extend_schema_view(
    **{
        action: extend_schema(parameters=[WORKFLOW_OWNER_PARAMETER])
        for action in ("retrieve", "update", "partial_update", "destroy")
    }
)
class WorkflowViewSet(viewsets.ModelViewSet):
    """Named, validated specs, unique per owner; shared workflows (no owner) are staff-managed.

    ``{name}`` is the caller's own workflow of that name, else the shared one (staff: another's with ``?owner=``).
    """

    queryset = Workflow.objects.all()
    serializer_class = WorkflowSerializer
    lookup_field = "name"
    filterset_fields: list[str] = []

    def get_queryset(self) -> QuerySet[Workflow]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return self.queryset.none()
        return visible_workflows(self.request).select_related("owner")

    def get_object(self) -> Workflow:
        workflow = services.find_workflow(self.kwargs[self.lookup_field], self._name_owner())
        if workflow is None:
            raise NotFound("No Workflow matches the given query.")
        self.check_object_permissions(self.request, workflow)
        return workflow

    def _name_owner(self) -> Any:
        """Whose names the URL's name is looked up among: the caller's, or for staff ``?owner=``'s."""
        username = self.request.query_params.get("owner")
        if username is None or not _is_staff(self.request):
            return self.request.user
        owner = User.objects.filter(username=username).first()
        if owner is None:
            raise NotFound("No Workflow matches the given query.")
        return owner

    def perform_create(self, serializer: BaseSerializer[Workflow]) -> None:
        _save_workflow(serializer, owner=self.request.user)

    def perform_update(self, serializer: BaseSerializer[Workflow]) -> None:
        self._check_can_change(serializer.instance)
        _save_workflow(serializer)

    def perform_destroy(self, instance: Workflow) -> None:
        self._check_can_change(instance)
        instance.delete()

    def _check_can_change(self, workflow: Workflow | None) -> None:
        if workflow is not None and workflow.owner_id != self.request.user.pk and not _is_staff(self.request):
            raise PermissionDenied("only staff can change a shared workflow")


def _save_workflow(serializer: BaseSerializer[Workflow], **fields: Any) -> None:
    try:
        with transaction.atomic():
            serializer.save(**fields)
    except IntegrityError as exc:  # a concurrent request took the name after this one's validation
        raise ValidationError({"name": [WORKFLOW_NAME_TAKEN]}) from exc


IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PARAMETER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    str,
    OpenApiParameter.HEADER,
    description="A repeat with the same key returns the same run; the same key with another body is a 422.",
)
KEY_REUSED = field_errors("The Idempotency-Key was used for another request (or its first is still running).")


class ConversationViewSet(
    OwnedMixin, mixins.ListModelMixin, mixins.CreateModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Conversations: their messages, and the runs that answer them."""

    queryset = Conversation.objects.all()
    serializer_class = ConversationSerializer

    def get_object(self) -> Conversation:
        """The URL's conversation if the user may see it (else 404), with its owner: who owns the runs it starts."""
        conversation = cast(Conversation, super().get_object())
        if conversation.owner_id == self.request.user.pk:
            conversation.owner = _user(self.request)  # no query for what the request has
        return conversation

    def perform_create(self, serializer: BaseSerializer[Conversation]) -> None:
        serializer.save(owner=self.request.user)

    def get_throttles(self) -> list[BaseThrottle]:
        throttles = super().get_throttles()
        if self.request.method == "POST" and self.action in ("messages", "runs"):
            throttles.append(RunCreationThrottle())
        return throttles

    @extend_schema(methods=["GET"], responses=MessageSerializer(many=True))
    @extend_schema(
        methods=["POST"],
        request=PostMessageSerializer,
        parameters=[IDEMPOTENCY_PARAMETER],
        responses={202: MessageAcceptedSerializer, 409: ActiveRunConflictSerializer, 422: KEY_REUSED},
    )
    @action(detail=True, methods=["get", "post"])
    def messages(self, request: Request, pk: str | None = None) -> Response:
        conversation = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(conversation.messages.all())
            return self.get_paginated_response(MessageSerializer(page, many=True).data)
        data = self._validated(PostMessageSerializer, request, conversation)
        admitted = Admitted(data)

        def post() -> Run:
            message, admitted.admission = services.post_message(
                conversation=conversation,
                content=data["content"],
                spec=data["spec"],
                workflow=data["workflow"],
                on_active=admitted.policy,
                deadline=data.get("deadline"),
                webhook_url=data.get("webhook", ""),
            )
            return cast(Run, message.run)

        try:
            outcome = _once_per_key(request, post)
        except double_texting.Busy as exc:
            return _active_run_conflict(exc)
        message = outcome.run.messages.get(role=MessageRole.USER)
        body = {
            "message": MessageSerializer(message).data,
            "run": RunSerializer(outcome.run).data,
            "on_active": admitted.of(outcome.run).as_dict(),
        }
        return _accepted(body, outcome)

    @extend_schema(
        request=StartRunSerializer,
        parameters=[IDEMPOTENCY_PARAMETER],
        responses={202: RunAcceptedSerializer, 409: ActiveRunConflictSerializer, 422: KEY_REUSED},
    )
    @action(detail=True, methods=["post"])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        conversation = self.get_object()
        data = self._validated(StartRunSerializer, request, conversation)
        admitted = Admitted(data)
        new = services.prepare_run(
            owner=conversation.owner,
            conversation=conversation,
            spec=data["spec"],
            input=data["input"],
            workflow=data["workflow"],
            deadline=data.get("deadline"),
            webhook_url=data.get("webhook", ""),
        )

        def start() -> Run:
            run, admitted.admission = services.start_conversation_run(
                conversation=conversation, on_active=admitted.policy, new=new
            )
            return run

        try:
            outcome = _once_per_key(request, start)
        except double_texting.Busy as exc:
            return _active_run_conflict(exc)
        body = RunSerializer(outcome.run).data | {"on_active": admitted.of(outcome.run).as_dict()}
        return _accepted(body, outcome)

    def _validated(self, serializer_class: type, request: Request, conversation: Conversation) -> dict[str, Any]:
        """Validate the body; resolve the workflow (or the default) to a spec.

        A workflow name means what it means to the run's owner, the conversation's (also when staff start the run).
        """
        serializer = serializer_class(data=request.data, context={"workflow_owner": conversation.owner})
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        workflow = data.pop("workflow_obj", None)
        if "spec" not in data:
            workflow = workflow or services.default_workflow(conversation.owner)
            if workflow is None:
                raise ValidationError(
                    {"workflow": [f'give a workflow or a spec: no default workflow "{settings.DEFAULT_WORKFLOW}"']}
                )
            data["spec"] = workflow.spec
        data["workflow"] = workflow
        return data


class Admitted:
    """The request's double-texting policy, and what it did (set by the request's run creation)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.policy = double_texting.policy_for(data.get("on_active"), data["workflow"])
        self.admission: double_texting.Admission | None = None

    def of(self, run: Run) -> double_texting.Admission:
        """This request's admission; for an idempotent repeat, the first request's (from the run's events)."""
        return self.admission or double_texting.admission_of(run, self.policy)


def _active_run_conflict(exc: double_texting.Busy) -> Response:
    return Response({"detail": str(exc), "active_run": exc.run_id}, status=status.HTTP_409_CONFLICT)


def _once_per_key(request: Request, create: Callable[[], Run]) -> services.Idempotent:
    """Create the run, or with an Idempotency-Key return the one it made before."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return services.Idempotent(run=create(), replayed=False)
    if not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        raise ValidationError({IDEMPOTENCY_HEADER: "must be 1 to 255 printable ASCII characters"})
    fingerprint = services.request_fingerprint(request.method, request.path, request.data)
    try:
        return services.once_per_key(_user(request), key, fingerprint, create)
    except services.KeyReused as exc:
        raise UnprocessableEntity({IDEMPOTENCY_HEADER: str(exc)}) from exc


def _accepted(body: Any, outcome: services.Idempotent) -> Response:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return Response(body, status=status.HTTP_202_ACCEPTED, headers=headers)


class UnprocessableEntity(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "the request cannot be processed"
    default_code = "unprocessable"


class RunConflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "the run is not in a state that allows this"
    default_code = "conflict"


class TooManyStreams(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "this server streams as many run events as it may; retry shortly"
    default_code = "too_many_streams"
    wait = 2  # seconds, sent as Retry-After


class EventStreamRenderer(BaseRenderer):
    """Lets a client ask for ``text/event-stream``; the stream itself is a
    StreamingHttpResponse, so this renders only errors (as JSON)."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return json.dumps(data).encode()


def last_event_id(request: Request) -> int:
    """Where a stream resumes: the Last-Event-ID header, else ``?after=``, else the start."""
    raw = request.headers.get("Last-Event-ID") or request.query_params.get("after") or "0"
    try:
        seq = int(raw)
    except ValueError:
        seq = -1
    if seq < 0:
        raise ValidationError({"Last-Event-ID": [f"must be an event id (a whole number >= 0), not {raw!r}"]})
    return seq


class RunFilter(filters.FilterSet):
    """The run list's filters: ``status``, ``conversation`` (an id) and ``workflow__name``, among what the caller sees.

    Another user's conversation is refused like a missing one (400); another user's workflow name matches nothing.
    """

    conversation = filters.ModelChoiceFilter(queryset=visible_conversations, label="Conversation")
    workflow__name = filters.CharFilter(method="filter_workflow_name", label="Workflow name")

    class Meta:
        model = Run
        fields = ["status", "conversation"]

    def filter_workflow_name(self, runs: QuerySet[Run], name: str, value: str) -> QuerySet[Run]:
        """The runs of the workflows named ``value`` that the caller sees (own and shared; staff: all); none if none.

        The workflows' ids are looked up first, so PostgreSQL plans the runs' query with their statistics.
        """
        workflow_ids = list(visible_workflows(self.request).filter(name=value).values_list("pk", flat=True))
        return runs.filter(workflow_id__in=workflow_ids) if workflow_ids else runs.none()


class RunViewSet(OwnedMixin, viewsets.ReadOnlyModelViewSet):
    """Runs with their status, output, error, timings and (in detail) steps.

    ``cancel`` stops an active run; ``retry`` replays a failed or cancelled one; ``resume`` answers a waiting one.
    """

    queryset = Run.objects.select_related("workflow")
    filterset_class = RunFilter

    def get_queryset(self) -> QuerySet[Run]:
        """The runs with what their serializer reads, in a fixed number of queries: the detail prefetches its steps;
        the list defers the JSON it does not show (the spec, the workflow's spec and description).
        """
        runs = super().get_queryset()
        if self.action == "retrieve":
            return runs.prefetch_related("steps")
        if self.action == "list":
            return runs.defer("spec", "workflow__spec", "workflow__description")
        return runs

    def get_serializer_class(self) -> type[BaseSerializer[Run]]:
        return RunDetailSerializer if self.action == "retrieve" else RunSerializer

    @extend_schema(request=None, responses={202: RunSerializer, 409: ErrorSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        run = self.get_object()
        try:
            services.cancel_run(run, by=_user(request).get_username())
        except services.Conflict as exc:
            raise RunConflict(str(exc)) from exc
        return Response(RunSerializer(Run.objects.get(pk=run.pk)).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=None,
        parameters=[
            OpenApiParameter("Last-Event-ID", str, OpenApiParameter.HEADER, description="Resume after this event."),
            OpenApiParameter("after", int, description="Resume after this event (if there is no Last-Event-ID)."),
        ],
        responses={(200, "text/event-stream"): OpenApiTypes.STR, 503: ErrorSerializer},
    )
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, EventStreamRenderer])
    def events(self, request: Request, pk: str | None = None) -> StreamingHttpResponse:
        """The run's events as Server-Sent Events, each a CloudEvents 1.0 JSON envelope: those after Last-Event-ID,
        then new ones as they happen, until the run's terminal event or EVENTS_STREAM_SECONDS (then reconnect with
        Last-Event-ID).
        """
        run = self.get_object()
        after = last_event_id(request)
        try:
            stream = EventStream(run.pk, after)
        except NoStreamSlot as exc:
            raise TooManyStreams() from exc
        response = StreamingHttpResponse(stream, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response

    @extend_schema(request=ResumeSerializer, responses={202: RunSerializer, 400: ErrorSerializer, 409: ErrorSerializer})
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        """Answer a waiting run: ``payload`` becomes its waiting step's output, and the run goes on."""
        run = self.get_object()
        body = ResumeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            services.resume_waiting_run(run, body.validated_data["payload"], by=_user(request).get_username())
        except services.Conflict as exc:
            raise RunConflict(str(exc)) from exc
        return Response(RunSerializer(Run.objects.get(pk=run.pk)).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: RunSerializer, 409: ErrorSerializer})
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        run = self.get_object()
        try:
            services.replay_run(run)
        except services.Conflict as exc:
            raise RunConflict(str(exc)) from exc
        return Response(RunSerializer(Run.objects.get(pk=run.pk)).data, status=status.HTTP_202_ACCEPTED)
