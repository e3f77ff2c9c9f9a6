"""Schemathesis against the API's own OpenAPI schema, in process, as a signed-in user.

The Django WSGI app answers on the test database. Each operation gets
generated requests that fit the schema (positive) and that break it
(negative); path ids mostly name a conversation, run and workflow the user
owns, so the fuzzed bodies reach the views. No answer may be a 5xx, and
every 4xx is JSON that says what is wrong: a non-empty ``detail`` or field
errors.

Runs the fuzzer starts stay in the test's transaction, which is rolled back:
their on-commit publish never happens, so nothing reaches the broker (the
session's worker would otherwise take messages for rows it cannot see).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from orchestration import services, transitions
from orchestration.api.parsers import MAX_DEPTH
from orchestration.models import Run

from .factories import ConversationFactory, WorkflowFactory, token_for

pytestmark = pytest.mark.django_db

# Webhook URLs (format "uri") whose hosts never leave the machine: IP literals,
# localhost, and names the resolver refuses before any lookup (a label too
# long, an empty one). A random host name would be a DNS query per case.
HOSTS = ["127.0.0.1", "10.1.2.3", "8.8.8.8", "[::1]", "[2001:db8::1]", "localhost", "a" * 64 + ".example", "a..b", ""]
schemathesis.openapi.format(
    "uri",
    st.builds(
        "{}://{}{}".format,
        st.sampled_from(["http", "https", "ftp", "file"]),
        st.sampled_from(HOSTS),
        st.from_regex(r"\A(/[A-Za-z0-9._~%:@-]{0,12}){0,3}\Z"),
    ),
)

# Per operation and generation mode: 18 operations x 2 modes x 60 cases, about
# 2000 requests, take 25-35 s on a 2-core machine (either database).
EXAMPLES = 60
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@dataclass
class Tally:
    """What the fuzzer did: cases per operation, and each bad answer once per operation and status."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)
    problems: dict[tuple[str, int, str], str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"schemathesis: {sum(self.cases.values())} cases, {len(self.cases)} operations, "
            f"{sum(self.server_errors.values())} answers 5xx (in {len(self.server_errors)} operations), "
            f"{len(self.problems)} distinct problems; by status: {dict(sorted(self.statuses.items()))}"
        )


@pytest.fixture
def conversation(user):
    return ConversationFactory(owner=user)


@pytest.fixture
def known_ids(user, conversation):
    """Path ids that exist for ``user``: a conversation with a failed run, and a workflow."""
    run = services.start_run(owner=user, spec={"skill": "echo"}, conversation=conversation, input={"q": 1})
    transitions.fail_run(run.pk, "failed for the fuzzer")
    workflow = WorkflowFactory(owner=user)
    return {"conversation": conversation.pk, "run": run.pk, "name": workflow.name}


@pytest.fixture
def wsgi_app() -> Iterator[Any]:
    """The WSGI app, minus the connection closing around each request.

    The test's transaction lives on the one connection, as under Django's
    own test client, which disconnects the same handlers.
    """
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield get_wsgi_application()
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


def what_is_wrong(body: Any) -> bool:
    """A 4xx body that says what is wrong: a non-empty detail, or field errors."""
    if not isinstance(body, dict) or not body:
        return False
    if "detail" in body:
        return bool(body["detail"])
    return all(messages for messages in body.values())


def path_ids(operation: Any, known: dict[str, Any]) -> dict[str, Any]:
    """The operation's path parameters, filled with ids the user owns."""
    if "{name}" in operation.path:
        return {"name": known["name"]}
    if "/conversations/{id}" in operation.path:
        return {"id": known["conversation"]}
    if "/runs/{id}" in operation.path:
        return {"id": known["run"]}
    return {}


def judge(case: Any, response: Any, tally: Tally) -> None:
    label = case.operation.label
    status = response.status_code
    tally.statuses[status] += 1
    problem = ""
    if status >= 500:
        problem = "server error"
        tally.server_errors[label] += 1
    elif status >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not what_is_wrong(body):
            problem = "4xx without a JSON body saying what is wrong"
    if not problem:
        try:
            case.validate_response(response, checks=[status_code_conformance, content_type_conformance])
        except (AssertionError, FailureGroup) as exc:
            problem = "schema: " + " / ".join(line.strip() for line in str(exc).splitlines()[1:6] if line.strip())
    if problem:
        key = (label, status, problem)
        tally.problems.setdefault(key, f"{case.as_curl_command()}\n  -> {status} {response.text[:300]}")


def fuzz(operation: Any, mode: GenerationMode, known: dict[str, Any], headers: dict[str, str], tally: Tally) -> None:
    real_ids = path_ids(operation, known)
    generated = operation.as_strategy(generation_mode=mode)
    strategy = st.one_of(generated, operation.as_strategy(generation_mode=mode, path_parameters=real_ids))

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy if real_ids else generated)
    def run(case: Any) -> None:
        tally.cases[operation.label] += 1
        response = case.call(headers=headers)
        judge(case, response, tally)

    try:
        run()
    except Unsatisfiable:
        # Nothing in the operation can be made invalid (no parameters, no body).
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_the_api_answers_fuzzed_requests_without_server_errors(user, known_ids, wsgi_app, settings, capsys):
    settings.EVENTS_STREAM_SECONDS = 0.1  # a stream of a run that is not over ends at once
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", wsgi_app)
    headers = {"Authorization": f"Token {token_for(user)}"}
    tally = Tally()

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        for mode in MODES:
            fuzz(operation, mode, known_ids, headers, tally)

    with capsys.disabled():
        print(f"\n{tally.summary()}")
        for label, count in sorted(tally.cases.items()):
            print(f"  {count:4d} {label}")
        for (label, status, problem), example in tally.problems.items():
            print(f"PROBLEM {label} {status} {problem}\n  {example}")
    assert not tally.problems
    assert 401 not in tally.statuses  # every case was signed in
    assert Run.objects.filter(owner=user).count() > 1  # fuzzed bodies got through to start runs


# Regressions: what the fuzzer found, one test each.


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://" + "a" * 64 + ".example/hook", "is not a valid host name"),  # was a 500 (IDNA UnicodeError)
        ("http://a..b/hook", "is not a valid host name"),
        ("http://[::1/hook", "not a valid URL"),  # httpx.InvalidURL
    ],
)
def test_a_webhook_url_with_an_invalid_host_is_a_400_naming_the_field(api, conversation, url, message):
    response = api.post(
        f"/api/conversations/{conversation.pk}/runs/", {"spec": {"skill": "echo"}, "webhook": url}, format="json"
    )

    assert response.status_code == 400
    assert any(message in error for error in response.json()["webhook"])
    assert not Run.objects.exists()


def test_a_conversation_webhook_with_an_invalid_host_is_a_400(api):
    response = api.post("/api/conversations/", {"title": "t", "webhook_url": "https://a..b/"}, format="json")

    assert response.status_code == 400
    assert any("is not a valid host name" in error for error in response.json()["webhook_url"])


@pytest.mark.parametrize("path", ["/api/runs/2.5e-3/", "/api/conversations/1.5e-3/messages/", "/api/no-such-thing/"])
def test_an_api_url_no_route_matches_answers_a_json_404(api, path):
    response = api.get(path)

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "no API resource at this URL"}


def test_a_url_outside_the_api_no_route_matches_keeps_the_html_404(client):
    response = client.get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_the_schema_documents_the_errors_an_operation_answers(anon):
    paths = anon.get("/api/schema/", {"format": "json"}).json()["paths"]
    start_run = paths["/api/conversations/{id}/runs/"]["post"]

    assert set(start_run["responses"]) == {"202", "400", "401", "403", "404", "409", "413", "415", "422", "429"}
    assert "Idempotency-Key" in [parameter["name"] for parameter in start_run["parameters"]]
    assert set(paths["/api/runs/"]["get"]["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "429",
    }  # a filter, a page
    assert set(paths["/api/runs/{id}/cancel/"]["post"]["responses"]) == {"202", "401", "403", "404", "409", "429"}
    assert set(paths["/api/skills/"]["get"]["responses"]) == {"200", "401", "403", "429"}


def test_the_schema_gives_each_method_of_messages_its_own_answers(anon):
    messages = anon.get("/api/schema/", {"format": "json"}).json()["paths"]["/api/conversations/{id}/messages/"]

    assert "202" not in messages["get"]["responses"]
    assert "200" not in messages["post"]["responses"]
    assert "202" in messages["post"]["responses"]


def test_a_body_nested_just_under_the_parsers_own_limit_is_a_400_not_a_500(api, conversation):
    # 900 levels parse (Python's limit is about 1000) but overflowed the stack when the run was stored.
    body = '{"spec": {"skill": "echo"}, "input": ' + "[" * 900 + "]" * 900 + "}"

    response = api.post(f"/api/conversations/{conversation.pk}/runs/", body, content_type="application/json")

    assert response.status_code == 400
    assert response.json() == {"detail": f"JSON parse error - the body is nested deeper than {MAX_DEPTH} levels"}
    assert not Run.objects.exists()


def test_a_body_nested_as_deep_as_allowed_is_accepted(api, conversation):
    levels = MAX_DEPTH - 1  # the body's own object is one level
    body = '{"spec": {"skill": "echo"}, "input": ' + "[" * levels + "]" * levels + "}"

    response = api.post(f"/api/conversations/{conversation.pk}/runs/", body, content_type="application/json")

    assert response.status_code == 202
