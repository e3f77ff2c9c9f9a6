"""extract_order, the worked example of docs/skills.md: the code, its test, and the doc showing both."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestration.services import start_run
from skills.registry import SkillContext, SkillError
from skills.support.orders import extract_order

from .conftest import wait_for_run

ROOT = Path(__file__).resolve().parent.parent


def context() -> SkillContext:
    return SkillContext(run_id=1, step_id=1, step_key="order", conversation_id=None, state={}, args={}, attempt=1)


@pytest.mark.parametrize(
    ("content", "order_id"),
    [
        ("I was charged twice for order 1042", 1042),
        ("Where is my order #20931?", 20931),
        ("order no. 5512 never arrived", 5512),
        ("Order Number 777 is wrong", 777),
        ("see #4410 please", 4410),
        ("I ordered 2 mugs on 12/03", None),
        ("call me at 555 0100", None),
        ("", None),
    ],
)
def test_it_finds_the_order_number(content, order_id):
    assert extract_order(context(), {"content": content, "intent": "billing"}) == {
        "content": content,
        "intent": "billing",
        "order_id": order_id,
    }


def test_a_ticket_without_content_is_refused():
    with pytest.raises(SkillError, match='the ticket has no "content" string'):
        extract_order(context(), {"intent": "billing"})


@pytest.mark.worker
def test_it_runs_as_a_step(worker, user):
    run = wait_for_run(start_run(owner=user, spec={"skill": "extract_order"}, input={"content": "order 1042?"}))

    assert (run.status, run.output) == ("succeeded", {"content": "order 1042?", "order_id": 1042})


def test_docs_skills_md_shows_this_skill_as_it_is():
    doc = (ROOT / "docs" / "skills.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    assert (ROOT / "skills" / "support" / "orders.py").read_text() in blocks
