from __future__ import annotations

import pytest
from django.urls import reverse

from orchestration.models import Message, Run, Step

from .factories import ConversationFactory, WorkflowFactory

pytestmark = pytest.mark.django_db

REFRESH = '<meta http-equiv="refresh" content="2">'


def make_run(owner, conversation=None, status="succeeded", **fields):
    return Run.objects.create(owner=owner, conversation=conversation, spec={"skill": "echo"}, status=status, **fields)


def make_step(run, key, **fields):
    defaults = {"path": key, "skill": "echo", "soft_time_limit": 5, "time_limit": 10, "queue": "default"}
    return Step.objects.create(run=run, key=key, **{**defaults, **fields})


@pytest.fixture
def conversation(user):
    return ConversationFactory(owner=user, title="Trip planning")


@pytest.fixture
def run(user, conversation):
    run = make_run(user, conversation, workflow=WorkflowFactory(name="fan-in"), output={"answer": 42})
    make_step(run, "search", skill="echo", status="succeeded", attempts=1, output={"hits": 3})
    make_step(run, "summarise", skill="flaky", status="failed", attempts=2, error="flaky: attempt 2 went wrong")
    return run


@pytest.mark.parametrize(
    "url", ["/", "/conversations/1/", "/runs/1/"], ids=["conversation-list", "conversation", "run"]
)
def test_it_redirects_anonymous_users_to_the_login(client, url):
    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


def test_a_user_who_is_not_staff_logs_in_and_lands_on_their_conversations(client, user, conversation):
    response = client.post(reverse("login"), {"username": user.username, "password": "password", "next": "/"})

    assert response.status_code == 302
    assert response["Location"] == "/"
    assert conversation.title in client.get("/").content.decode()


def test_it_lists_only_own_conversations(client, user, conversation):
    ConversationFactory(title="Someone else's")
    client.force_login(user)

    response = client.get(reverse("pages:conversation-list"))

    assert response.status_code == 200
    assert "Trip planning" in response.content.decode()
    assert "Someone else&#x27;s" not in response.content.decode()


def test_it_shows_a_conversation_with_messages_and_runs(client, user, conversation, run):
    Message.objects.create(conversation=conversation, role="user", content="Where to go?", run=run)
    Message.objects.create(conversation=conversation, role="assistant", content="Lyon", run=run)
    client.force_login(user)

    response = client.get(reverse("pages:conversation-detail", args=[conversation.pk]))

    html = response.content.decode()
    assert response.status_code == 200
    assert "Where to go?" in html
    assert "Lyon" in html
    assert 'class="message role-assistant"' in html
    assert f'href="{reverse("pages:run-detail", args=[run.pk])}"' in html
    assert 'class="badge status-succeeded"' in html


def test_it_escapes_message_content(client, user, conversation):
    Message.objects.create(conversation=conversation, role="user", content="<script>alert(1)</script>")
    client.force_login(user)

    html = client.get(reverse("pages:conversation-detail", args=[conversation.pk])).content.decode()

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_it_shows_a_run_with_its_steps(client, user, run):
    client.force_login(user)

    response = client.get(reverse("pages:run-detail", args=[run.pk]))

    html = response.content.decode()
    assert response.status_code == 200
    assert f"Run {run.pk}" in html
    assert "fan-in" in html
    assert "search" in html
    assert "summarise" in html
    assert "flaky: attempt 2 went wrong" in html
    assert 'class="badge status-failed"' in html
    assert '{"answer": 42}' in html  # the output, embedded as JSON
    assert '{"hits": 3}' in html


@pytest.mark.parametrize("name", ["conversation-detail", "run-detail"])
def test_it_answers_404_for_another_users_objects(client, other_user, run, name):
    pk = run.conversation_id if name == "conversation-detail" else run.pk
    client.force_login(other_user)

    response = client.get(reverse(name, args=[pk]))

    assert response.status_code == 404


def test_staff_see_every_users_pages(client, staff_user, conversation, run):
    client.force_login(staff_user)

    assert "Trip planning" in client.get(reverse("pages:conversation-list")).content.decode()
    assert client.get(reverse("pages:conversation-detail", args=[conversation.pk])).status_code == 200
    assert client.get(reverse("pages:run-detail", args=[run.pk])).status_code == 200


def test_a_held_runs_page_names_the_run_it_waits_for(client, user, conversation, run):
    held = make_run(user, conversation, status="queued", waiting_for=run)
    client.force_login(user)

    html = client.get(reverse("pages:run-detail", args=[held.pk])).content.decode()

    assert "Waiting for" in html
    assert reverse("pages:run-detail", args=[run.pk]) in html


@pytest.mark.parametrize("status", ["queued", "running", "waiting"])
def test_the_run_page_follows_the_runs_events_while_it_is_active(client, user, status):
    run = make_run(user, status=status)
    client.force_login(user)

    html = client.get(reverse("pages:run-detail", args=[run.pk])).content.decode()

    assert f'data-events="/api/runs/{run.pk}/events/?after={run.last_event_seq}"' in html
    assert "new EventSource(" in html
    assert f"<noscript>{REFRESH}</noscript>" in html


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_the_run_page_stops_refreshing_once_the_run_ended(client, user, status):
    run = make_run(user, status=status)
    client.force_login(user)

    html = client.get(reverse("pages:run-detail", args=[run.pk])).content.decode()

    assert REFRESH not in html
    assert "EventSource" not in html
