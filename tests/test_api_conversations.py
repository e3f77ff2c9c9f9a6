"""/api/conversations/: a user's conversations and their ``state``."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from orchestration.models import Conversation

from .factories import ConversationFactory

pytestmark = pytest.mark.django_db


def listed_ids(client: APIClient) -> list[int]:
    response = client.get("/api/conversations/")
    assert response.status_code == 200
    return [c["id"] for c in response.json()["results"]]


def test_it_creates_a_conversation_owned_by_the_user(api, user):
    response = api.post("/api/conversations/", {"title": "Support"}, format="json")

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["title"] == "Support"
    assert data["state"] == {}
    assert Conversation.objects.get(pk=data["id"]).owner == user


def test_it_creates_a_conversation_without_a_title(api):
    response = api.post("/api/conversations/", {}, format="json")

    assert response.status_code == 201
    assert response.json()["title"] == ""


def test_it_ignores_a_client_supplied_state(api):
    response = api.post("/api/conversations/", {"title": "t", "state": {"admin": True}}, format="json")

    assert response.status_code == 201
    assert response.json()["state"] == {}


def test_it_rejects_a_title_over_200_characters(api):
    response = api.post("/api/conversations/", {"title": "x" * 201}, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["title"]


def test_it_lists_only_the_users_conversations_newest_first(api, user, other_user):
    older, newer = ConversationFactory.create(owner=user), ConversationFactory.create(owner=user)
    ConversationFactory.create(owner=other_user)

    assert listed_ids(api) == [newer.pk, older.pk]


def test_it_lists_every_conversation_to_staff(staff_api, user, other_user):
    conversations = [ConversationFactory.create(owner=user), ConversationFactory.create(owner=other_user)]

    assert {c.pk for c in conversations} <= set(listed_ids(staff_api))


def test_it_paginates_the_list(api, user):
    ConversationFactory.create_batch(3, owner=user)

    data = api.get("/api/conversations/", {"page_size": 2}).json()

    assert data["count"] == 3
    assert len(data["results"]) == 2
    assert data["next"]


def test_it_retrieves_a_conversation_with_its_state(api, user):
    conversation = ConversationFactory.create(owner=user, state={"intent": "refund", "turns": 2})

    response = api.get(f"/api/conversations/{conversation.pk}/")

    assert response.status_code == 200
    data = response.json()
    assert data["id"] == conversation.pk
    assert data["title"] == conversation.title
    assert data["state"] == {"intent": "refund", "turns": 2}
    assert set(data) == {"id", "title", "state", "webhook_url", "created_at", "updated_at"}


def test_it_answers_404_for_another_users_conversation(api, other_user):
    theirs = ConversationFactory.create(owner=other_user)

    assert api.get(f"/api/conversations/{theirs.pk}/").status_code == 404


def test_it_answers_404_for_a_missing_conversation(api):
    assert api.get("/api/conversations/999999/").status_code == 404


def test_it_shows_staff_any_conversation(staff_api, other_user):
    theirs = ConversationFactory.create(owner=other_user)

    assert staff_api.get(f"/api/conversations/{theirs.pk}/").status_code == 200


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_it_does_not_allow_changing_or_deleting_a_conversation(api, user, method):
    conversation = ConversationFactory.create(owner=user)

    response = getattr(api, method)(f"/api/conversations/{conversation.pk}/", {"title": "new"}, format="json")

    assert response.status_code == 405
    assert Conversation.objects.get(pk=conversation.pk).title == conversation.title


def test_it_accepts_session_authentication(anon, user):
    ConversationFactory.create(owner=user)
    user.save()  # UserFactory's set_password is not saved, and the session hash is derived from the password
    anon.force_login(user)

    assert len(listed_ids(anon)) == 1


def test_it_rejects_a_wrong_token(anon):
    anon.credentials(HTTP_AUTHORIZATION="Token not-a-token")

    assert anon.get("/api/conversations/").status_code == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/api/conversations/"), ("post", "/api/conversations/"), ("get", "/api/conversations/{pk}/")],
)
def test_it_needs_authentication(anon, user, method, path):
    conversation = ConversationFactory.create(owner=user)

    response = getattr(anon, method)(path.format(pk=conversation.pk), {"title": "x"}, format="json")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert Conversation.objects.count() == 1
