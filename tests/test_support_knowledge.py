"""knowledge_search: the database's full-text search over the seed articles, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

from orchestration.services import start_run
from skills.models import Article
from skills.support.articles import load_articles, seed_articles
from skills.support.knowledge import evaluate, heldout_rows, query_terms, search_articles

from .conftest import wait_for_run
from .factories import UserFactory

CHARGED_TWICE = "I was charged twice for order 1042, my email is [email]"


@pytest.fixture
def seeded(db: None) -> None:
    """The seed articles as the fixture has them (a transactional test before may have flushed them)."""
    load_articles(Article)


def slugs(query: str, **kwargs: Any) -> list[str]:
    return [article["slug"] for article in search_articles(query, **kwargs)]


def test_the_seed_has_at_least_forty_articles_of_every_category():
    articles = seed_articles()

    assert len(articles) >= 40
    assert len({a["slug"] for a in articles}) == len(articles)
    assert {a["category"] for a in articles} == {
        "billing",
        "orders",
        "shipping",
        "returns",
        "account",
        "technical",
        "products",
        "sales",
        "policies",
        "general",
    }
    assert all(80 <= len(a["body"].split()) <= 200 for a in articles)


def test_query_terms_drop_stop_words_numbers_and_masked_pii():
    assert query_terms(CHARGED_TWICE) == ["charged", "twice", "order", "email"]
    assert query_terms("Hi, can you help me? I don't know...") == []


def test_the_charged_twice_message_finds_the_duplicate_charge_article_first(seeded):
    [first, *rest] = search_articles(CHARGED_TWICE)

    assert first["slug"] == "duplicate-charge"
    assert first["title"] == "Charged twice for one order"
    assert first["category"] == "billing"
    assert first["text"] == Article.objects.get(slug="duplicate-charge").body
    assert len(rest) == 2
    assert first["score"] > rest[0]["score"] >= rest[1]["score"] > 0


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("forgot my password and the reset email never comes", "password-reset"),
        ("the vase arrived smashed into pieces", "damaged-parcel"),
        ("I want to swap these trainers for another colour", "exchanges"),
        ("do you deliver to Canada and will I pay customs", "international-shipping"),
        ("how do I check how much is left on my gift card", "gift-cards"),
        ("can my company pay by invoice with 30 day terms", "business-accounts"),
    ],
)
def test_real_queries_find_the_article_that_answers_them_first(seeded, query, expected):
    assert slugs(query)[0] == expected


def test_k_sets_how_many_articles_come_back(seeded):
    assert len(slugs("refund", k=1)) == 1
    assert len(slugs("refund", k=5)) == 5


def test_a_disabled_article_is_never_found(seeded):
    Article.objects.filter(slug="duplicate-charge").update(enabled=False)

    found = slugs(CHARGED_TWICE, k=20)

    assert found
    assert "duplicate-charge" not in found


def test_a_category_is_preferred_not_required(seeded):
    query = "sent my jeans back two weeks ago and still no money, how long does it take"
    plain = search_articles(query, k=20)
    assert plain[0]["slug"] == "refund-timing"  # billing

    preferred = search_articles(query, k=10, category="returns")

    assert preferred[0]["slug"] == "return-refund-status"
    assert {a["category"] for a in preferred} > {"returns"}  # the others still come
    plain_scores = {a["slug"]: a["score"] for a in plain}
    for article in preferred:
        boost = 1.5 if article["category"] == "returns" else 1.0
        assert article["score"] == pytest.approx(boost * plain_scores[article["slug"]], abs=1e-3)
    assert [a["score"] for a in preferred] == sorted((a["score"] for a in preferred), reverse=True)


def test_an_article_edited_in_the_admin_is_searched_as_edited_at_once(seeded, admin_client):
    query = "Can I bring my dog along?"
    assert slugs(query) == []
    article = Article.objects.get(slug="store-locations")

    response = admin_client.post(
        f"/admin/skills/article/{article.pk}/change/",
        {
            "slug": article.slug,
            "title": "Showrooms, and bringing your dog",
            "category": article.category,
            "body": article.body + " Dogs on a lead are welcome in both showrooms.",
            "tags": article.tags + ", dog, pets",
            "enabled": "on",
        },
    )

    assert response.status_code == 302, response.content[:2000]
    assert slugs(query) == ["store-locations"]
    Article.objects.filter(slug="store-locations").update(enabled=False)
    assert slugs(query) == []


def test_a_query_with_nothing_to_search_finds_nothing(seeded):
    assert search_articles("") == []
    assert search_articles("Hi! Can you please help me?") == []
    assert search_articles("1042 [email] [phone]") == []


def test_a_very_long_message_is_searched_by_its_first_words(seeded):
    message = CHARGED_TWICE + " " + " ".join(f"word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(500))

    assert len(query_terms(message)) == 64
    assert slugs(message)[0] == "duplicate-charge"


def test_evaluate_counts_hits_and_reciprocal_ranks_within_k():
    rows = [
        {"query": "a", "slugs": ["x"]},  # rank 1
        {"query": "b", "slugs": ["y", "z"]},  # rank 2 (z)
        {"query": "c", "slugs": ["w"]},  # rank 4: outside k
    ]
    ranked = {"a": ["x", "q", "r"], "b": ["q", "z", "y"], "c": ["q", "r", "s", "w"]}

    result = evaluate(rows, k=3, search=lambda query, k: ranked[query])

    assert result == {"n": 3, "hit_rate": round(2 / 3, 4), "mrr": round((1 + 1 / 2) / 3, 4)}
    assert evaluate([], search=lambda query, k: []) == {"n": 0, "hit_rate": 0.0, "mrr": 0.0}


def test_the_held_out_queries_are_answered_within_the_top_three(seeded):
    rows = heldout_rows()
    known = {a["slug"] for a in seed_articles()}
    assert len(rows) >= 50
    assert all(set(row["slugs"]) <= known for row in rows)

    result = evaluate(rows, k=3)

    print(f"held-out retrieval on {connection.vendor}: {result}")
    assert result["n"] == len(rows)
    assert result["hit_rate"] >= 0.8
    assert result["mrr"] >= 0.7


def search_spec(**args: Any) -> dict[str, Any]:
    return {"skill": "knowledge_search", "args": args}


@pytest.mark.worker
def test_a_run_adds_the_articles_to_the_ticket(worker):
    load_articles(Article)  # the flush of an earlier test removed them
    ticket = {"content": CHARGED_TWICE, "conversation_id": None, "intent": "billing"}

    run = wait_for_run(start_run(owner=UserFactory(), spec=search_spec(k=2, category="billing"), input=ticket))

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert {key: output[key] for key in ticket} == ticket
    assert output["articles"][0]["slug"] == "duplicate-charge"
    assert len(output["articles"]) == 2


@pytest.mark.worker
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"k": 0}, "knowledge_search: args.k must be a whole number from 1 to 20, not 0"),
        ({"category": "shoes"}, "knowledge_search: args.category must be one of billing, orders, shipping"),
    ],
)
def test_bad_args_fail_the_step_with_a_clear_message(worker, args, message):
    run = wait_for_run(start_run(owner=UserFactory(), spec=search_spec(**args), input={"content": "refund"}))

    assert run.status == "failed"
    assert message in run.error
    assert run.steps.get().attempts == 1  # not retried: a retry cannot help
