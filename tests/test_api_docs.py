"""The API's self-description (/api/schema/, /api/docs/), its root, and /healthz."""

from __future__ import annotations

import re

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command

pytestmark = pytest.mark.django_db


CONTRACT_PATHS = {
    "/api/skills/",
    "/api/workflows/",
    "/api/workflows/{name}/",
    "/api/conversations/",
    "/api/conversations/{id}/",
    "/api/conversations/{id}/messages/",
    "/api/conversations/{id}/runs/",
    "/api/runs/",
    "/api/runs/{id}/",
}


def asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


def test_the_schema_is_public_openapi_3(anon):
    response = anon.get("/api/schema/", {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert set(schema["paths"]) >= CONTRACT_PATHS


def test_the_schema_is_yaml_by_default(anon):
    response = anon.get("/api/schema/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi")
    assert response.content.startswith(b"openapi: 3.")


def test_the_schema_declares_token_authentication(anon):
    schema = anon.get("/api/schema/", {"format": "json"}).json()

    assert "tokenAuth" in schema["components"]["securitySchemes"]


def test_the_schema_generates_without_warnings_and_validates(tmp_path):
    # --fail-on-warn turns any warning (an unguessable serializer, a bad path) into an error.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))


def test_the_docs_page_is_public(anon):
    response = anon.get("/api/docs/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    assert b"swagger-ui" in response.content


def test_the_docs_page_loads_no_assets_from_a_cdn(anon):
    html = anon.get("/api/docs/").content.decode()

    # A URL naming a CDN (not any "cdn" in the page: a random CSRF token can hold one).
    assert not re.search(r"//[^\s\"'<>]*(cdn|jsdelivr|unpkg)", html, re.IGNORECASE)
    assets = asset_urls(html)
    assert any(url.endswith(".js") for url in assets)
    assert all(url.startswith("/") and not url.startswith("//") for url in assets), assets


def test_the_docs_page_assets_are_shipped_with_the_service(anon):
    html = anon.get("/api/docs/").content.decode()
    static = [url for url in asset_urls(html) if url.startswith("/static/")]

    assert static
    for url in static:
        assert finders.find(url.removeprefix("/static/")), f"{url} is not a local static file"


def test_the_api_root_needs_authentication(anon):
    response = anon.get("/api/")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


def test_the_api_root_lists_the_collections(api):
    response = api.get("/api/")

    assert response.status_code == 200
    assert {"skills", "workflows", "conversations", "runs"} <= set(response.json())


def test_healthz_answers_ok_without_authentication(anon):
    response = anon.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
