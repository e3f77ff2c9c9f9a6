"""Ownership on every route: a user reaches only their own objects, staff reach all.

The route matrix is built from the URL conf: every URL name under /api/ (and
in the ``pages`` namespace) and each method its view offers must have an
expectation in ROUTES (or PAGES), so a new route fails
test_every_api_route_has_an_expectation until someone says what it owes to
its owner, another user, staff and anonymous.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.test import APIClient

from orchestration.models import Conversation, Run, Workflow

from .factories import ConversationFactory, RunFactory, UserFactory, WorkflowFactory, token_for

pytestmark = pytest.mark.django_db

ECHO = {"skill": "echo"}
CHAIN = {"chain": [{"skill": "echo"}, {"skill": "echo"}]}


@dataclass(frozen=True)
class Owned:
    """The owner's objects that the routes' URLs name."""

    owner: User
    workflow: Workflow
    conversation: Conversation
    run: Run  # queued: cancel answers 202
    failed_run: Run  # retry answers 202


@pytest.fixture
def owned(user: User) -> Owned:
    conversation = ConversationFactory.create(owner=user)
    return Owned(
        owner=user,
        workflow=WorkflowFactory.create(owner=user),
        conversation=conversation,
        run=RunFactory.create(owner=user, conversation=conversation),
        failed_run=RunFactory.create(owner=user, conversation=conversation, status="failed", error="boom"),
    )


@dataclass(frozen=True)
class Expect:
    """What one method of one route answers each caller; the URL and body come from the owner's objects."""

    url: Callable[[Owned], str]
    owner: int = 200
    other: int = 404
    staff: int | None = None  # None: as the owner
    body: Callable[[Owned], dict[str, Any]] | None = None
    public: bool = False  # anonymous get what the owner gets
    listed: tuple[str, Callable[[Owned], Any]] | None = None  # a list: (key, the owner's object's value)
    staff_names_owner: bool = False  # staff address it with ?owner=<username>

    @property
    def staff_status(self) -> int:
        return self.owner if self.staff is None else self.staff


def url(name: str, key: str | None = None, of: Callable[[Owned], Any] | None = None) -> Callable[[Owned], str]:
    if key is None or of is None:
        return lambda o: reverse(name)
    return lambda o: reverse(name, kwargs={key: of(o)})


def workflow_of(o: Owned) -> str:
    return o.workflow.name


def conversation_of(o: Owned) -> int:
    return o.conversation.pk


def run_of(o: Owned) -> int:
    return o.run.pk


WORKFLOW = url("workflow-detail", "name", workflow_of)
CONVERSATION_MESSAGES = url("conversation-messages", "pk", conversation_of)
MESSAGE = {"content": "hi", "spec": ECHO}

# (URL name, method) -> what it answers. 409 and 400 are the documented answers for an action that
# the object's state or the body does not allow; every other owner's answer is a 2xx.
ROUTES: dict[tuple[str, str], Expect] = {
    ("api-root", "get"): Expect(url("api-root"), other=200),
    ("schema", "get"): Expect(url("schema"), other=200, public=True),
    ("docs", "get"): Expect(url("docs"), other=200, public=True),
    ("skill-list", "get"): Expect(url("skill-list"), other=200),
    ("workflow-list", "get"): Expect(url("workflow-list"), other=200, listed=("name", workflow_of)),
    # The owner's own name: the owner is told it is taken; another user (and staff) may use it too.
    ("workflow-list", "post"): Expect(
        url("workflow-list"), owner=400, other=201, staff=201, body=lambda o: {"name": o.workflow.name, "spec": ECHO}
    ),
    ("workflow-detail", "get"): Expect(WORKFLOW, staff_names_owner=True),
    ("workflow-detail", "put"): Expect(
        WORKFLOW, body=lambda o: {"name": o.workflow.name, "spec": CHAIN}, staff_names_owner=True
    ),
    ("workflow-detail", "patch"): Expect(WORKFLOW, body=lambda o: {"description": "d"}, staff_names_owner=True),
    ("workflow-detail", "delete"): Expect(WORKFLOW, owner=204, staff_names_owner=True),
    ("conversation-list", "get"): Expect(url("conversation-list"), other=200, listed=("id", conversation_of)),
    ("conversation-list", "post"): Expect(
        url("conversation-list"), owner=201, other=201, body=lambda o: {"title": "t"}
    ),
    ("conversation-detail", "get"): Expect(url("conversation-detail", "pk", conversation_of)),
    ("conversation-messages", "get"): Expect(CONVERSATION_MESSAGES),
    ("conversation-messages", "post"): Expect(CONVERSATION_MESSAGES, owner=202, body=lambda o: MESSAGE),
    ("conversation-runs", "post"): Expect(
        url("conversation-runs", "pk", conversation_of), owner=202, body=lambda o: {"spec": ECHO}
    ),
    ("run-list", "get"): Expect(url("run-list"), other=200, listed=("id", run_of)),
    ("run-detail", "get"): Expect(url("run-detail", "pk", run_of)),
    ("run-cancel", "post"): Expect(url("run-cancel", "pk", run_of), owner=202),
    ("run-retry", "post"): Expect(url("run-retry", "pk", lambda o: o.failed_run.pk), owner=202),
    # The owner's run is queued, not waiting (tests/test_human_in_the_loop.py resumes waiting ones).
    ("run-resume", "post"): Expect(url("run-resume", "pk", run_of), owner=409, body=lambda o: {"payload": 1}),
    ("run-events", "get"): Expect(url("run-events", "pk", run_of)),
}

PAGES: dict[str, Callable[[Owned], str]] = {
    "pages:conversation-list": lambda o: reverse("pages:conversation-list"),
    "pages:conversation-detail": lambda o: reverse("pages:conversation-detail", args=[o.conversation.pk]),
    "pages:run-detail": lambda o: reverse("pages:run-detail", args=[o.run.pk]),
}
LISTING_PAGES = {"pages:conversation-list"}


def _patterns(patterns: list[Any], prefix: str = "", namespace: str = "") -> Iterator[tuple[str, str, URLPattern]]:
    """(route, namespaced name, pattern) of every URL pattern, nested includes included."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            yield from _patterns(pattern.url_patterns, prefix + str(pattern.pattern), inner)
        else:
            yield prefix + str(pattern.pattern), f"{namespace}{pattern.name}", pattern


def _methods(pattern: URLPattern) -> set[str]:
    """The methods a pattern's view answers (not OPTIONS and HEAD, which every view has)."""
    actions = getattr(pattern.callback, "actions", None)  # a DRF viewset's route
    if actions is not None:
        # DRF adds "head" to a viewset's actions once it has answered a GET.
        return set(actions) - {"options", "head"}
    view_class = getattr(pattern.callback, "cls", None) or getattr(pattern.callback, "view_class", None)
    assert view_class is not None, f"{pattern}: a view without a class; say what it owes in ROUTES"
    return {m for m in view_class.http_method_names if hasattr(view_class, m)} - {"options", "head"}


def api_routes() -> set[tuple[str, str]]:
    return {
        (name, method)
        for route, name, pattern in _patterns(get_resolver().url_patterns)
        if route.startswith("api/")
        for method in _methods(pattern)
    }


def page_names() -> set[str]:
    return {name for _, name, _ in _patterns(get_resolver().url_patterns) if name.startswith("pages:")}


def client_of(user: User | None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def call(client: APIClient, route: tuple[str, str], owned: Owned, **query: str) -> Any:
    """Send the route's request; a stream (run events) is closed at once, its slot given back."""
    expect = ROUTES[route]
    path = expect.url(owned)
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    body = expect.body(owned) if expect.body else None
    response = getattr(client, route[1])(path, body, format="json")
    if response.streaming:
        response.close()
    return response


def snapshot(owned: Owned) -> dict[str, Any]:
    """What a request may change of the owner's objects."""
    return {
        "workflows": list(Workflow.objects.filter(owner=owned.owner).values("name", "description", "spec")),
        "runs": list(Run.objects.filter(owner=owned.owner).values("pk", "status", "replays")),
        "messages": owned.conversation.messages.count(),
        "conversations": Conversation.objects.filter(owner=owned.owner).count(),
    }


def listed(response: Any, key: str) -> list[Any]:
    return [item[key] for item in response.json()["results"]]


# --- the matrix ---------------------------------------------------------------------------


def test_every_api_route_has_an_expectation():
    assert api_routes() == set(ROUTES)


def test_every_page_has_an_expectation():
    assert page_names() == set(PAGES)


@pytest.mark.parametrize("route", sorted(ROUTES), ids="-".join)
def test_the_owner_reaches_their_own_objects(owned, route):
    expect = ROUTES[route]

    response = call(client_of(owned.owner), route, owned)

    assert response.status_code == expect.owner, getattr(response, "content", b"")
    if expect.listed:
        key, value_of = expect.listed
        assert value_of(owned) in listed(response, key)


# Not the public ones: they show no one's objects, and the docs page carries a fresh CSRF token.
@pytest.mark.parametrize("route", sorted(r for r, e in ROUTES.items() if e.other != 201 and not e.public), ids="-".join)
def test_another_user_is_answered_as_if_the_owners_objects_did_not_exist(owned, other_user, route):
    expect = ROUTES[route]
    client = client_of(other_user)
    before = snapshot(owned)

    response = call(client, route, owned)
    assert snapshot(owned) == before
    owned.owner.delete()  # and everything the owner had
    without = call(client, route, owned)

    assert response.status_code == without.status_code == expect.other
    assert response["Content-Type"] == without["Content-Type"]
    assert response.content == without.content


@pytest.mark.parametrize("route", sorted(r for r, e in ROUTES.items() if e.other == 201), ids="-".join)
def test_another_user_creates_their_own_without_touching_the_owners(owned, other_user, route):
    before = snapshot(owned)

    response = call(client_of(other_user), route, owned)

    assert response.status_code == 201, response.content
    assert snapshot(owned) == before


@pytest.mark.parametrize("route", sorted(ROUTES), ids="-".join)
def test_staff_reach_every_users_objects(owned, staff_user, route):
    expect = ROUTES[route]
    query = {"owner": owned.owner.username} if expect.staff_names_owner else {}

    response = call(client_of(staff_user), route, owned, **query)

    assert response.status_code == expect.staff_status, getattr(response, "content", b"")
    if expect.listed:
        key, value_of = expect.listed
        assert value_of(owned) in listed(response, key)


@pytest.mark.parametrize("route", sorted(ROUTES), ids="-".join)
def test_anonymous_get_401_with_the_token_challenge(owned, route):
    expect = ROUTES[route]
    before = snapshot(owned)

    response = call(client_of(None), route, owned)

    if expect.public:
        assert response.status_code == expect.owner
    else:
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == "Token"
        assert response.json() == {"detail": "Authentication credentials were not provided."}
    assert snapshot(owned) == before


@pytest.mark.parametrize("name", sorted(PAGES))
def test_pages_show_the_owner_and_staff_but_no_other_user(client, owned, other_user, staff_user, name):
    path = PAGES[name](owned)
    statuses = {}
    for who, user in {"owner": owned.owner, "other": other_user, "staff": staff_user}.items():
        client.force_login(user)
        statuses[who] = client.get(path).status_code

    other = 200 if name in LISTING_PAGES else 404
    assert statuses == {"owner": 200, "other": other, "staff": 200}


def test_the_conversation_list_page_shows_no_other_users_conversations(client, owned, other_user):
    client.force_login(other_user)

    assert owned.conversation.title not in client.get(reverse("pages:conversation-list")).content.decode()


@pytest.mark.parametrize("name", sorted(PAGES))
def test_pages_send_anonymous_to_the_login(client, owned, name):
    response = client.get(PAGES[name](owned))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


# --- the run list's conversation filter -------------------------------------------------------


def test_the_run_list_refuses_another_users_conversation_as_a_missing_one(api, other_user):
    theirs = ConversationFactory.create(owner=other_user)
    RunFactory.create(owner=other_user, conversation=theirs)

    response = api.get("/api/runs/", {"conversation": theirs.pk})
    unknown = api.get("/api/runs/", {"conversation": theirs.pk + 1000})

    assert response.status_code == unknown.status_code == 400
    assert response.json() == unknown.json()
    assert list(response.json()) == ["conversation"]


def test_the_run_list_filters_by_ones_own_conversation(api, user):
    mine = RunFactory.create(owner=user)
    RunFactory.create(owner=user)

    response = api.get("/api/runs/", {"conversation": mine.conversation_id})

    assert response.status_code == 200
    assert listed(response, "id") == [mine.pk]


def test_staff_filter_runs_by_any_users_conversation(staff_api, other_user):
    theirs = RunFactory.create(owner=other_user)

    response = staff_api.get("/api/runs/", {"conversation": theirs.conversation_id})

    assert response.status_code == 200
    assert listed(response, "id") == [theirs.pk]


# --- workflow names, unique per owner --------------------------------------------------------


def workflow_names(client: APIClient) -> list[str]:
    response = client.get("/api/workflows/", {"page_size": 200})
    assert response.status_code == 200
    return [w["name"] for w in response.json()["results"]]


def test_two_users_may_give_their_workflows_one_name(api, user, other_user):
    WorkflowFactory.create(owner=other_user, name="summarise", spec=CHAIN)

    response = api.post("/api/workflows/", {"name": "summarise", "spec": ECHO}, format="json")

    assert response.status_code == 201, response.content
    assert (response.json()["owner"], response.json()["spec"]) == (user.username, ECHO)
    assert workflow_names(api).count("summarise") == 1
    assert api.get("/api/workflows/summarise/").json()["spec"] == ECHO


def test_a_user_may_not_take_their_own_name_twice(api, user):
    WorkflowFactory.create(owner=user, name="summarise")

    response = api.post("/api/workflows/", {"name": "summarise", "spec": ECHO}, format="json")

    assert response.status_code == 400
    assert response.json() == {"name": ["workflow with this name already exists."]}


def test_a_user_may_not_take_a_shared_name(api):
    shared = WorkflowFactory.create(owner=None)

    response = api.post("/api/workflows/", {"name": shared.name, "spec": ECHO}, format="json")

    assert response.status_code == 400
    assert response.json() == {"name": ["workflow with this name already exists."]}


def test_a_rename_may_not_take_a_name_the_owner_has(api, user):
    WorkflowFactory.create(owner=user, name="first")
    WorkflowFactory.create(owner=user, name="second")

    response = api.patch("/api/workflows/second/", {"name": "first"}, format="json")

    assert response.status_code == 400
    assert response.json() == {"name": ["workflow with this name already exists."]}


def test_a_rename_may_take_another_users_name(api, user, other_user):
    WorkflowFactory.create(owner=other_user, name="first")
    WorkflowFactory.create(owner=user, name="second")

    response = api.patch("/api/workflows/second/", {"name": "first"}, format="json")

    assert response.status_code == 200, response.content
    assert Workflow.objects.filter(name="first").count() == 2


def test_a_users_own_workflow_wins_over_a_shared_one_named_later(api, user):
    WorkflowFactory.create(owner=user, name="summarise", spec=CHAIN)
    WorkflowFactory.create(owner=None, name="summarise", spec=ECHO)  # staff, in the admin
    conversation = ConversationFactory.create(owner=user)

    detail = api.get("/api/workflows/summarise/")
    run = api.post(f"/api/conversations/{conversation.pk}/runs/", {"workflow": "summarise"}, format="json")

    assert detail.json()["spec"] == CHAIN
    assert run.status_code == 202, run.content
    assert Run.objects.get(pk=run.json()["id"]).spec == CHAIN


def test_a_run_starts_the_owners_workflow_of_that_name(api, user, other_user):
    WorkflowFactory.create(owner=other_user, name="summarise", spec=ECHO)
    mine = WorkflowFactory.create(owner=user, name="summarise", spec=CHAIN)
    conversation = ConversationFactory.create(owner=user)

    response = api.post(f"/api/conversations/{conversation.pk}/runs/", {"workflow": "summarise"}, format="json")

    assert response.status_code == 202, response.content
    assert Run.objects.get(pk=response.json()["id"]).workflow == mine


def test_staff_start_a_run_with_the_conversation_owners_workflow(staff_api, staff_user, user):
    WorkflowFactory.create(owner=staff_user, name="summarise", spec=ECHO)
    theirs = WorkflowFactory.create(owner=user, name="summarise", spec=CHAIN)
    conversation = ConversationFactory.create(owner=user)
    body = {"content": "hi", "workflow": "summarise"}

    response = staff_api.post(f"/api/conversations/{conversation.pk}/messages/", body, format="json")

    assert response.status_code == 202, response.content
    run = Run.objects.get(pk=response.json()["run"]["id"])
    assert (run.owner, run.workflow) == (user, theirs)


def test_another_users_workflow_named_like_the_default_is_not_ones_default(api, user, other_user, settings):
    settings.DEFAULT_WORKFLOW = "house-default"
    WorkflowFactory.create(owner=other_user, name="house-default")
    conversation = ConversationFactory.create(owner=user)

    response = api.post(f"/api/conversations/{conversation.pk}/messages/", {"content": "hi"}, format="json")

    assert response.status_code == 400
    assert response.json() == {"workflow": ['give a workflow or a spec: no default workflow "house-default"']}


def test_staff_reach_another_users_workflow_by_naming_its_owner(staff_api, staff_user, user):
    WorkflowFactory.create(owner=staff_user, name="summarise", spec=ECHO)
    WorkflowFactory.create(owner=user, name="summarise", spec=CHAIN)

    own = staff_api.get("/api/workflows/summarise/")
    theirs = staff_api.get("/api/workflows/summarise/", {"owner": user.username})

    assert (own.json()["spec"], own.json()["owner"]) == (ECHO, staff_user.username)
    assert (theirs.json()["spec"], theirs.json()["owner"]) == (CHAIN, user.username)


def test_a_user_cannot_reach_another_users_workflow_by_naming_its_owner(api, other_user):
    theirs = WorkflowFactory.create(owner=other_user)

    response = api.get(f"/api/workflows/{theirs.name}/", {"owner": other_user.username})

    assert response.status_code == 404


def test_the_run_list_by_workflow_name_shows_only_ones_own_runs(api, user, other_user):
    mine = RunFactory.create(owner=user, workflow=WorkflowFactory.create(owner=user, name="summarise"))
    RunFactory.create(owner=other_user, workflow=WorkflowFactory.create(owner=other_user, name="summarise"))

    assert listed(api.get("/api/runs/", {"workflow__name": "summarise"}), "id") == [mine.pk]


def test_staff_list_the_runs_of_every_workflow_of_a_name(staff_api, user, other_user):
    runs = [
        RunFactory.create(owner=owner, workflow=WorkflowFactory.create(owner=owner, name="summarise"))
        for owner in (user, other_user, UserFactory())
    ]

    response = staff_api.get("/api/runs/", {"workflow__name": "summarise"})

    assert sorted(listed(response, "id")) == sorted(r.pk for r in runs)


def test_the_database_refuses_two_shared_workflows_of_one_name():
    WorkflowFactory.create(owner=None, name="summarise")

    with pytest.raises(IntegrityError), transaction.atomic():
        Workflow.objects.create(owner=None, name="summarise", spec=ECHO)
