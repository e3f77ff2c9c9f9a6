"""REST API views.

Every queryset is filtered by owner (staff see all), so another user's object
answers 404 rather than 403: its existence is not disclosed.
"""

from __future__ import annotations

from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Q, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from orchestration import services
from orchestration.models import Conversation, Run, Workflow
from skills.registry import registry

from .serializers import (
    ConversationSerializer,
    MessageAcceptedSerializer,
    MessageSerializer,
    PostMessageSerializer,
    RunDetailSerializer,
    RunSerializer,
    SkillSerializer,
    StartRunSerializer,
    WorkflowSerializer,
)


def _is_staff(request: Request) -> bool:
    return bool(request.user and request.user.is_staff)


def _user(request: Request) -> User:
    """The authenticated user (every view requires authentication)."""
    return cast(User, request.user)


def visible_workflows(request: Request) -> QuerySet[Workflow]:
    """A user's own workflows and the shared ones; staff see all."""
    workflows = Workflow.objects.all()
    if _is_staff(request):
        return workflows
    return workflows.filter(Q(owner=_user(request)) | Q(owner__isnull=True))


class OwnedMixin(GenericAPIView[Any]):
    """Filters the view's queryset to the request user's objects (staff: all)."""

    def get_queryset(self) -> QuerySet[Any]:
        queryset = super().get_queryset()
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return queryset.none()
        return queryset if _is_staff(self.request) else queryset.filter(owner=_user(self.request))


class SkillViewSet(viewsets.ViewSet):
    """The registered skills, with their queues, limits and retry policy."""

    @extend_schema(responses=SkillSerializer(many=True))
    def list(self, request: Request) -> Response:
        return Response(SkillSerializer(list(registry), many=True).data)


class WorkflowViewSet(viewsets.ModelViewSet):
    """Named, validated specs. Shared workflows (no owner) are staff-managed."""

    queryset = Workflow.objects.all()
    serializer_class = WorkflowSerializer
    lookup_field = "name"
    filterset_fields: list[str] = []

    def get_queryset(self) -> QuerySet[Workflow]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return self.queryset.none()
        return visible_workflows(self.request)

    def perform_create(self, serializer: BaseSerializer[Workflow]) -> None:
        serializer.save(owner=self.request.user)

    def perform_update(self, serializer: BaseSerializer[Workflow]) -> None:
        self._check_can_change(serializer.instance)
        serializer.save()

    def perform_destroy(self, instance: Workflow) -> None:
        self._check_can_change(instance)
        instance.delete()

    def _check_can_change(self, workflow: Workflow | None) -> None:
        if workflow is not None and workflow.owner_id != self.request.user.pk and not _is_staff(self.request):
            raise PermissionDenied("only staff can change a shared workflow")


class ConversationViewSet(
    OwnedMixin, mixins.ListModelMixin, mixins.CreateModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Conversations: their messages, and the runs that answer them."""

    queryset = Conversation.objects.all()
    serializer_class = ConversationSerializer

    def perform_create(self, serializer: BaseSerializer[Conversation]) -> None:
        serializer.save(owner=self.request.user)

    @extend_schema(
        request=PostMessageSerializer, responses={200: MessageSerializer(many=True), 202: MessageAcceptedSerializer}
    )
    @action(detail=True, methods=["get", "post"])
    def messages(self, request: Request, pk: str | None = None) -> Response:
        conversation = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(conversation.messages.all())
            return self.get_paginated_response(MessageSerializer(page, many=True).data)
        data = self._validated(PostMessageSerializer, request)
        message = services.post_message(
            conversation=conversation,
            content=data["content"],
            spec=data["spec"],
            workflow=data["workflow"],
        )
        body = {"message": MessageSerializer(message).data, "run": RunSerializer(message.run).data}
        return Response(body, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=StartRunSerializer, responses={202: RunSerializer})
    @action(detail=True, methods=["post"])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        conversation = self.get_object()
        data = self._validated(StartRunSerializer, request)
        run = services.start_run(
            owner=conversation.owner,
            spec=data["spec"],
            input=data["input"],
            conversation=conversation,
            workflow=data["workflow"],
        )
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

    def _validated(self, serializer_class: type, request: Request) -> dict[str, Any]:
        """Validate the body; resolve the workflow (or the default) to a spec."""
        serializer = serializer_class(data=request.data, context={"workflows": visible_workflows(request)})
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        workflow = data.pop("workflow_obj", None)
        if "spec" not in data:
            workflow = workflow or services.default_workflow()
            if workflow is None:
                raise ValidationError(
                    {"workflow": f'give a workflow or a spec: no default workflow "{settings.DEFAULT_WORKFLOW}"'}
                )
            data["spec"] = workflow.spec
        data["workflow"] = workflow
        return data


class RunViewSet(OwnedMixin, viewsets.ReadOnlyModelViewSet):
    """Runs with their status, output, error, timings and (in detail) steps."""

    queryset = Run.objects.select_related("workflow")
    filterset_fields = ["status", "conversation", "workflow__name"]

    def get_queryset(self) -> QuerySet[Run]:
        runs = super().get_queryset()
        return runs.prefetch_related("steps") if self.action == "retrieve" else runs

    def get_serializer_class(self) -> type[BaseSerializer[Run]]:
        return RunDetailSerializer if self.action == "retrieve" else RunSerializer
