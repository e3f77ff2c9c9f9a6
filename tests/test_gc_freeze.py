"""Web and worker processes keep what they loaded at startup out of the garbage collector's full passes.

A full collection walked every object Django, the skills and the intent model
made, about 200,000: pauses of 40 to 150 ms that every request or step in
that process waited out (docs/performance.md). ``gc.freeze()`` once loaded
moves them to the permanent generation, which collections skip.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from celery.signals import worker_init, worker_process_init
from django.urls import clear_url_caches, get_resolver

from agentsite import gunicorn_conf
from agentsite.worker import freeze_startup_objects


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_web_process_loads_its_urlconf_then_freezes_it():
    clear_url_caches()

    gunicorn_conf.post_worker_init(worker=None)

    assert "url_patterns" in vars(get_resolver())  # loaded before the freeze, not by the first request
    assert gc.get_freeze_count() > 10_000


@pytest.mark.parametrize("signal", [worker_init, worker_process_init], ids=["main process", "pool process"])
def test_a_worker_process_freezes_what_it_loaded(signal):
    # Sent here, the signals would run their other receivers in the test process too.
    assert freeze_startup_objects in signal._live_receivers(None)

    freeze_startup_objects()

    assert gc.get_freeze_count() > 10_000
