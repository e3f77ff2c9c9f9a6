"""Server-rendered pages: a user's conversations and a run's steps."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from .models import Conversation, Run


def _own(request: HttpRequest, queryset: QuerySet) -> QuerySet:
    return queryset if request.user.is_staff else queryset.filter(owner=request.user)


@login_required
def conversation_list(request: HttpRequest) -> HttpResponse:
    conversations = _own(request, Conversation.objects.select_related("owner"))[:100]
    return render(request, "orchestration/conversation_list.html", {"conversations": conversations})


@login_required
def conversation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = get_object_or_404(_own(request, Conversation.objects.all()), pk=pk)
    context = {
        "conversation": conversation,
        "conversation_messages": conversation.messages.all(),
        "runs": conversation.runs.select_related("workflow")[:50],
    }
    return render(request, "orchestration/conversation_detail.html", context)


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(_own(request, Run.objects.select_related("workflow", "conversation")), pk=pk)
    return render(request, "orchestration/run_detail.html", {"run": run, "steps": run.steps.all()})
