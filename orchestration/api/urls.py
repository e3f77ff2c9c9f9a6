"""The one router of the REST API."""

from __future__ import annotations

from rest_framework.routers import DefaultRouter

from .views import ConversationViewSet, RunViewSet, SkillViewSet, WorkflowViewSet

router = DefaultRouter()
router.register("skills", SkillViewSet, basename="skill")
router.register("workflows", WorkflowViewSet, basename="workflow")
router.register("conversations", ConversationViewSet, basename="conversation")
router.register("runs", RunViewSet, basename="run")

urlpatterns = router.urls
