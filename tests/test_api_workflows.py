"""/api/workflows/: named, validated specs; shared ones (no owner) are staff-managed."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from orchestration.models import Workflow

from .factories import WorkflowFactory, token_for

pytestmark = pytest.mark.django_db


CHAIN = {"chain": [{"skill": "echo"}, {"skill": "echo", "args": {"value": 2}}]}


@pytest.fixture
def staff_api(staff_user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(staff_user)}")
    return client


def listed_names(client: APIClient) -> set[str]:
    response = client.get("/api/workflows/", {"page_size": 200})
    assert response.status_code == 200
    return {w["name"] for w in response.json()["results"]}


def test_it_lists_own_and_shared_workflows(api, user, other_user):
    mine = WorkflowFactory.create(owner=user)
    shared = WorkflowFactory.create(owner=None)
    theirs = WorkflowFactory.create(owner=other_user)

    names = listed_names(api)

    assert {mine.name, shared.name} <= names
    assert theirs.name not in names


def test_it_lists_every_workflow_to_staff(staff_api, user, other_user):
    workflows = [
        WorkflowFactory.create(owner=user),
        WorkflowFactory.create(owner=other_user),
        WorkflowFactory.create(owner=None),
    ]

    assert {w.name for w in workflows} <= listed_names(staff_api)


def test_it_marks_shared_workflows(api, user):
    mine = WorkflowFactory.create(owner=user)
    shared = WorkflowFactory.create(owner=None)

    assert api.get(f"/api/workflows/{mine.name}/").json()["shared"] is False
    assert api.get(f"/api/workflows/{shared.name}/").json()["shared"] is True


def test_it_creates_a_workflow_owned_by_the_user(api, user):
    body = {"name": "two-echoes", "description": "Echo twice.", "spec": CHAIN}

    response = api.post("/api/workflows/", body, format="json")

    assert response.status_code == 201, response.content
    data = response.json()
    assert {k: data[k] for k in ("name", "description", "spec", "shared")} == {**body, "shared": False}
    assert Workflow.objects.get(name="two-echoes").owner == user


def test_it_rejects_a_name_the_user_already_has(api, user):
    taken = WorkflowFactory.create(owner=user)

    response = api.post("/api/workflows/", {"name": taken.name, "spec": CHAIN}, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["name"]


def test_it_accepts_a_name_another_user_has(api, other_user):
    theirs = WorkflowFactory.create(owner=other_user)

    response = api.post("/api/workflows/", {"name": theirs.name, "spec": CHAIN}, format="json")

    assert response.status_code == 201, response.content


def test_it_rejects_a_name_that_is_not_a_slug(api):
    response = api.post("/api/workflows/", {"name": "two words", "spec": CHAIN}, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["name"]


def test_it_requires_a_spec(api):
    response = api.post("/api/workflows/", {"name": "empty"}, format="json")

    assert response.status_code == 400
    assert response.json() == {"spec": ["This field is required."]}


def test_it_gets_a_workflow_by_name(api, user):
    workflow = WorkflowFactory.create(owner=user, spec=CHAIN, description="d")

    response = api.get(f"/api/workflows/{workflow.name}/")

    assert response.status_code == 200
    data = response.json()
    assert (data["name"], data["description"], data["spec"]) == (workflow.name, "d", CHAIN)
    assert data["created_at"]
    assert data["updated_at"]


def test_it_replaces_a_workflow(api, user):
    workflow = WorkflowFactory.create(owner=user)
    body = {"name": workflow.name, "description": "now a chain", "spec": CHAIN}

    response = api.put(f"/api/workflows/{workflow.name}/", body, format="json")

    assert response.status_code == 200, response.content
    workflow.refresh_from_db()
    assert (workflow.description, workflow.spec) == ("now a chain", CHAIN)
    assert workflow.owner == user


def test_it_validates_the_spec_on_update(api, user):
    workflow = WorkflowFactory.create(owner=user)
    body = {"name": workflow.name, "spec": {"chain": [{"skill": "echo"}, {"skill": "serch"}]}}

    response = api.put(f"/api/workflows/{workflow.name}/", body, format="json")

    assert response.status_code == 400
    assert response.json()["spec"][0].startswith('spec.chain[1].skill: unknown skill "serch"')
    workflow.refresh_from_db()
    assert workflow.spec == {"skill": "echo"}


def test_it_deletes_a_workflow(api, user):
    workflow = WorkflowFactory.create(owner=user)

    response = api.delete(f"/api/workflows/{workflow.name}/")

    assert response.status_code == 204
    assert not Workflow.objects.filter(pk=workflow.pk).exists()


def test_it_forbids_a_user_to_change_a_shared_workflow(api):
    shared = WorkflowFactory.create(owner=None)

    response = api.put(f"/api/workflows/{shared.name}/", {"name": shared.name, "spec": CHAIN}, format="json")

    assert response.status_code == 403
    shared.refresh_from_db()
    assert shared.spec == {"skill": "echo"}


def test_it_forbids_a_user_to_delete_a_shared_workflow(api):
    shared = WorkflowFactory.create(owner=None)

    response = api.delete(f"/api/workflows/{shared.name}/")

    assert response.status_code == 403
    assert Workflow.objects.filter(pk=shared.pk).exists()


def test_it_lets_staff_change_and_delete_a_shared_workflow(staff_api):
    shared = WorkflowFactory.create(owner=None)

    response = staff_api.put(f"/api/workflows/{shared.name}/", {"name": shared.name, "spec": CHAIN}, format="json")
    assert response.status_code == 200
    shared.refresh_from_db()
    assert shared.spec == CHAIN
    assert shared.owner is None  # still shared

    assert staff_api.delete(f"/api/workflows/{shared.name}/").status_code == 204
    assert not Workflow.objects.filter(pk=shared.pk).exists()


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
def test_it_answers_404_for_another_users_workflow(api, other_user, method):
    theirs = WorkflowFactory.create(owner=other_user)

    response = getattr(api, method)(
        f"/api/workflows/{theirs.name}/", {"name": theirs.name, "spec": CHAIN}, format="json"
    )

    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.spec == {"skill": "echo"}


def test_it_answers_404_for_an_unknown_name(api):
    assert api.get("/api/workflows/nope/").status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/workflows/"),
        ("post", "/api/workflows/"),
        ("get", "/api/workflows/{name}/"),
        ("put", "/api/workflows/{name}/"),
        ("patch", "/api/workflows/{name}/"),
        ("delete", "/api/workflows/{name}/"),
    ],
)
def test_it_needs_authentication(anon, user, method, path):
    workflow = WorkflowFactory.create(owner=user)

    response = getattr(anon, method)(path.format(name=workflow.name), {"name": "x", "spec": CHAIN}, format="json")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    workflow.refresh_from_db()
    assert workflow.spec == {"skill": "echo"}
