"""skills.support.llm against a local OpenAI-compatible server (tests/llm_server.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from skills.registry import SkillContext
from skills.support import llm

from .llm_server import FakeLLM, Reply


def context(soft_time_limit: float | None = 30, **overrides: Any) -> SkillContext:
    return SkillContext(
        run_id=7,
        step_id=9,
        step_key="reply",
        conversation_id=None,
        state={},
        args={},
        attempt=1,
        soft_time_limit=soft_time_limit,
        **overrides,
    )


def test_a_completion_carries_the_model_the_key_and_the_idempotency_key(fake_llm: FakeLLM) -> None:
    completion = llm.chat(context(), [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])

    assert completion.text == "hi"
    assert completion.model == "fake-model"
    [request] = fake_llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == "fake-model"
    assert request.body["messages"][0] == {"role": "system", "content": "be brief"}
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["idempotency-key"] == "7:reply"


def test_without_configuration_it_refuses_without_calling(settings: Any) -> None:
    settings.LLM_BASE_URL = ""
    assert not llm.configured()
    with pytest.raises(llm.LLMError, match="no LLM is configured") as raised:
        llm.chat(context(), [{"role": "user", "content": "hi"}])
    assert not raised.value.transient


@pytest.mark.parametrize(("status", "transient"), [(429, True), (503, True), (400, False), (401, False)])
def test_an_error_status_says_whether_a_retry_may_help(fake_llm: FakeLLM, status: int, transient: bool) -> None:
    fake_llm.script(Reply(status=status))
    with pytest.raises(llm.LLMError, match=f"HTTP {status}") as raised:
        llm.chat(context(), [{"role": "user", "content": "hi"}])
    assert raised.value.transient is transient


def test_a_body_that_is_not_a_completion_is_refused(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(raw=b'{"choices": []}'))
    with pytest.raises(llm.LLMError, match="not a chat completion"):
        llm.chat(context(), [{"role": "user", "content": "hi"}])


def test_the_call_ends_a_margin_before_the_steps_soft_limit(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(delay=5))
    started = time.monotonic()
    with pytest.raises(llm.LLMError, match="did not answer within") as raised:
        llm.chat(context(soft_time_limit=2.5), [{"role": "user", "content": "hi"}])
    elapsed = time.monotonic() - started
    assert raised.value.transient
    assert 1.0 < elapsed < 2.2  # 2.5 s soft limit less the 1 s margin


def test_with_no_time_left_it_does_not_call(fake_llm: FakeLLM) -> None:
    with pytest.raises(llm.LLMError, match="no time left"):
        llm.chat(context(soft_time_limit=0.5), [{"role": "user", "content": "hi"}])
    assert fake_llm.requests == []
