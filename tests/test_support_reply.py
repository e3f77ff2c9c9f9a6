"""compose_reply: an answer grounded in the found articles, by the LLM (tests/llm_server.py) or offline."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.services import start_run
from orchestration.tasks import StepConversation
from skills.models import Article
from skills.registry import SkillContext, SkillError
from skills.support.articles import load_articles, seed_articles
from skills.support.reply import APOLOGY, NO_ARTICLES, OPENINGS, compose_reply, split_sentences

from .conftest import Worker, wait_for_run, worker_instead
from .factories import ConversationFactory, MessageFactory
from .llm_server import FakeLLM, Reply, serving

CHARGED_TWICE = "I was charged twice for order 1042, my email is [email]"
SEED = {article["slug"]: article for article in seed_articles()}


def found(*slugs: str) -> list[dict[str, Any]]:
    """Articles as knowledge_search gives them, from the seed."""
    return [
        {"slug": s, "title": SEED[s]["title"], "category": SEED[s]["category"], "score": 1.0, "text": SEED[s]["body"]}
        for s in slugs
    ]


def context(soft_time_limit: float = 30, conversation_id: int | None = None) -> SkillContext:
    return SkillContext(
        run_id=7,
        step_id=9,
        step_key="reply",
        conversation_id=conversation_id,
        state={},
        args={},
        attempt=1,
        soft_time_limit=soft_time_limit,
        skill="compose_reply",
        conversation=None if conversation_id is None else StepConversation(conversation_id, run_id=7, step_id=9),
    )


def ticket(**fields: Any) -> dict[str, Any]:
    return {
        "content": CHARGED_TWICE,
        "intent": "billing",
        "articles": found("duplicate-charge", "refund-timing"),
    } | fields


def body_of(reply: str) -> str:
    """The reply without its opening, closing and Sources line: the quoted sentences."""
    return reply.split("\n\n")[1]


@pytest.fixture
def offline(settings: Any) -> None:
    settings.LLM_BASE_URL = ""


@pytest.mark.parametrize("intent", ["billing", "technical", "complaint", "sales", "faq", "general"])
def test_an_offline_reply_opens_for_the_intent_and_quotes_the_articles(offline, intent):
    out = compose_reply(context(), ticket(intent=intent))

    reply = out["reply"]
    assert reply.startswith(OPENINGS[intent])
    assert (APOLOGY in reply) is (intent == "complaint")
    quoted = split_sentences(body_of(reply))
    cited_text = " ".join(SEED[slug]["body"] for slug in out["cited"])
    assert 1 <= len(quoted) <= 3
    assert all(sentence in cited_text for sentence in quoted)
    assert out["cited"][0] == "duplicate-charge"
    assert set(out["cited"]) <= {"duplicate-charge", "refund-timing"}
    titles = ", ".join(f"{SEED[s]['title']} ({s})" for s in out["cited"])
    assert reply.endswith(f"\n\nSources: {titles}")
    assert out["reply_source"] == "offline"
    assert "llm_error" not in out
    assert {k: out[k] for k in ticket()} == ticket(intent=intent)  # the ticket passes on


def test_the_offline_reply_quotes_the_sentences_that_match_the_message(offline):
    out = compose_reply(context(), ticket())

    quoted = body_of(out["reply"])

    # the sentences sharing most of "charged", "twice", "order" (stemmed), in the article's order
    assert quoted.startswith("If you see two charges for the same order,")
    assert "If you were charged twice because checkout failed and you ordered again" in quoted
    assert "Klarna" not in quoted


def test_an_angry_customer_is_apologised_to_whatever_the_intent(offline):
    out = compose_reply(context(), ticket(sentiment={"compound": -0.8, "label": "negative", "angry": True}))

    assert out["reply"].startswith(f"{OPENINGS['billing']} {APOLOGY}")


def test_without_articles_a_person_will_follow_up(offline):
    out = compose_reply(context(), ticket(articles=[]))

    assert NO_ARTICLES in out["reply"]
    assert out["reply"].endswith("\n\nSources: none")
    assert out["cited"] == []
    assert out["reply_source"] == "offline"


def test_a_chord_list_is_merged_into_one_ticket(offline):
    sentiment = {"sentiment": {"compound": -0.9, "label": "negative", "angry": True}}

    out = compose_reply(context(), [ticket(), sentiment])

    assert out["sentiment"] == sentiment["sentiment"]
    assert APOLOGY in out["reply"]


@pytest.mark.parametrize("articles", ["none", [{"slug": "x"}], [1]])
def test_articles_that_are_not_articles_are_refused(offline, articles):
    with pytest.raises(SkillError, match="the ticket's articles must be a list of") as raised:
        compose_reply(context(), ticket(articles=articles))
    assert not raised.value.transient


@pytest.mark.django_db
def test_the_llm_is_given_the_history_the_intent_and_the_articles(fake_llm):
    fake_llm.answer = lambda body: "Sorry! The duplicate is refunded in full [duplicate-charge].\nSources: made up"
    conversation = ConversationFactory.create()
    MessageFactory(conversation=conversation, role="user", content="Hello, a question about my order")
    MessageFactory(conversation=conversation, role="assistant", content="Of course, what is the order number?")
    MessageFactory(conversation=conversation, role="user", content=CHARGED_TWICE)

    out = compose_reply(context(conversation_id=conversation.pk), ticket())

    assert out["reply_source"] == "llm"
    assert out["cited"] == ["duplicate-charge"]
    assert out["reply"] == (
        "Sorry! The duplicate is refunded in full [duplicate-charge].\n\n"
        "Sources: Charged twice for one order (duplicate-charge)"
    )
    [request] = fake_llm.requests
    system, user = request.body["messages"]
    assert system["role"] == "system"
    assert "slug" in system["content"]
    prompt = user["content"]
    assert "user: Hello, a question about my order\nassistant: Of course, what is the order number?" in prompt
    assert prompt.count(CHARGED_TWICE) == 1  # the message being answered is not repeated as history
    assert "Intent: billing" in prompt
    for article in found("duplicate-charge", "refund-timing"):
        assert f"[{article['slug']}] {article['title']}\n{article['text']}" in prompt
    assert prompt.endswith(f"Customer's message:\n{CHARGED_TWICE}")


def test_an_llm_answer_that_names_no_article_cites_all_it_was_given(fake_llm):
    fake_llm.answer = lambda body: "Your duplicate charge will be refunded."

    out = compose_reply(context(), ticket())

    assert out["cited"] == ["duplicate-charge", "refund-timing"]
    assert out["reply"].endswith(
        "Sources: Charged twice for one order (duplicate-charge), When will I get my refund? (refund-timing)"
    )


@pytest.mark.parametrize(
    ("script", "soft_time_limit", "error"),
    [
        (Reply(status=500), 30, "the LLM answered HTTP 500"),
        (Reply(status=401), 30, "the LLM answered HTTP 401"),
        (Reply(raw=b"{}"), 30, "not a chat completion"),
        (Reply(delay=5), 2.5, "the LLM did not answer within"),
    ],
)
def test_when_the_llm_fails_the_reply_is_written_offline(fake_llm, script, soft_time_limit, error):
    fake_llm.script(script)

    out = compose_reply(context(soft_time_limit=soft_time_limit), ticket())

    assert out["reply_source"] == "offline"
    assert error in out["llm_error"]
    assert out["reply"].startswith(OPENINGS["billing"])
    assert out["cited"][0] == "duplicate-charge"


def test_without_articles_the_llm_is_not_asked(fake_llm):
    out = compose_reply(context(), ticket(articles=[]))

    assert fake_llm.requests == []
    assert NO_ARTICLES in out["reply"]


SEARCH_THEN_REPLY = {"chain": [{"skill": "knowledge_search"}, {"skill": "compose_reply"}]}
ANGRY = {"sentiment": {"compound": -0.85, "label": "negative", "angry": True}}
CHORD = {
    "chord": {
        "header": [{"skill": "knowledge_search"}, {"skill": "echo", "args": {"value": ANGRY}}],
        "body": {"skill": "compose_reply"},
    }
}


@pytest.mark.worker
def test_a_chain_searches_then_replies_offline(worker, user):
    load_articles(Article)  # the flush of an earlier test removed them
    input = {"content": CHARGED_TWICE, "conversation_id": None, "intent": "billing"}

    run = wait_for_run(start_run(owner=user, spec=SEARCH_THEN_REPLY, input=input))

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert output["articles"][0]["slug"] == "duplicate-charge"
    assert output["reply_source"] == "offline"
    assert output["cited"][0] == "duplicate-charge"
    assert "\n\nSources: Charged twice for one order (duplicate-charge)" in output["reply"]


@pytest.mark.worker
def test_a_chord_of_search_and_sentiment_replies_with_an_apology(worker, user):
    load_articles(Article)
    input = {"content": CHARGED_TWICE, "conversation_id": None, "intent": "billing"}

    run = wait_for_run(start_run(owner=user, spec=CHORD, input=input))

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert output["sentiment"] == ANGRY["sentiment"]
    assert [a["slug"] for a in output["articles"]][:1] == ["duplicate-charge"]
    assert output["reply"].startswith(f"{OPENINGS['billing']} {APOLOGY}")
    assert output["reply_source"] == "offline"


@pytest.mark.worker
def test_a_worker_with_an_llm_replies_from_the_prompt_it_built(worker: Worker, user):
    load_articles(Article)
    conversation = ConversationFactory.create(owner=user)
    MessageFactory(conversation=conversation, role="user", content="My last order was fine, this one is not.")
    input = {"content": CHARGED_TWICE, "conversation_id": conversation.pk, "intent": "billing"}
    llm = FakeLLM(answer=lambda body: "We refund the second charge in full [duplicate-charge].")

    with serving(llm), worker_instead(worker, "llm", {"LLM_BASE_URL": llm.base_url, "LLM_MODEL": "fake-model"}):
        run = wait_for_run(start_run(owner=user, spec=CHORD, input=input, conversation=conversation))

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert output["reply_source"] == "llm"
    assert output["cited"] == ["duplicate-charge"]
    assert output["reply"].endswith("\n\nSources: Charged twice for one order (duplicate-charge)")
    [request] = llm.requests
    prompt = request.body["messages"][1]["content"]
    assert "user: My last order was fine, this one is not." in prompt
    assert "Intent: billing" in prompt
    assert "[duplicate-charge] Charged twice for one order" in prompt
    assert request.headers["idempotency-key"].startswith(f"{run.pk}:")
