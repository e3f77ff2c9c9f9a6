"""The runs' admin pages show each run's trace id and find a run by it."""

from __future__ import annotations

import pytest

from .factories import RunFactory

pytestmark = pytest.mark.django_db

TRACE_ID = "32403aa56c96840953fcd5fe82eac7fa"


def test_the_run_list_finds_a_run_by_its_trace_id(admin_client):
    traced, _ = RunFactory.create(trace_id=TRACE_ID), RunFactory.create()

    response = admin_client.get("/admin/orchestration/run/", {"q": TRACE_ID})

    assert response.status_code == 200
    assert [run.pk for run in response.context["cl"].result_list] == [traced.pk]
    assert TRACE_ID in response.content.decode()


def test_the_run_page_shows_its_trace_id_read_only(admin_client):
    run = RunFactory.create(trace_id=TRACE_ID)

    response = admin_client.get(f"/admin/orchestration/run/{run.pk}/change/")

    assert response.status_code == 200
    assert TRACE_ID in response.content.decode()
    assert 'name="trace_id"' not in response.content.decode()
