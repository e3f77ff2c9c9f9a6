"""``knowledge_search``: the help-centre articles that answer the ticket, ranked offline by the database.

The message's searchable words, joined by OR, go to the database's full-text search (index: ``articles``);
``evaluate`` measures the ranking on labelled queries. See docs/skills.md, "knowledge_search".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection

from skills.models import Article, ArticleCategory
from skills.registry import SkillContext, SkillError, skill

from .articles import DATA_DIR, FTS_TABLE, POSTGRES_VECTOR
from .ticket import content_of, ticket_of

HELDOUT_FILE = DATA_DIR / "retrieval_heldout.jsonl"
DEFAULT_K = 3
MAX_K = 20
CATEGORY_BOOST = 1.5
MAX_TERMS = 64  # of a long message, the first distinct words are searched
CANDIDATES = 50  # ranked by the database before the category boost re-orders them
# bm25() column weights on SQLite, in the FTS table's column order (title, tags, body).
SQLITE_WEIGHTS = (8.0, 4.0, 1.0)
MASKED = re.compile(r"\[(?:email|phone|card|id)\]")
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
STOP_WORDS_TEXT = """
    a about above after again against all also am an and any are aren't as at be because been before being below
    between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
    few for from further get got had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
    herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more
    most mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't
    she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
    there there's these they they'd they'll they're they've this those through to too under until up very was
    wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
    whom why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
    hi hello hey dear thanks thank please pls ok okay yes yeah im ive dont didnt cant wont isnt doesnt
    would like want wanted need needs help know tell just still really anyone something anything thing things
"""
STOP_WORDS = frozenset(STOP_WORDS_TEXT.split())


@skill(
    description="Adds articles: the top-k help-centre articles for the customer's message (args.k, default 3), "
    "best first, as {slug, title, category, score, text}; args.category prefers that category.",
    soft_time_limit=5,
    time_limit=10,
    retries=1,  # a locked or restarting database may answer the next attempt
    backoff=1.0,
)
def knowledge_search(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    k, category = _k_of(ctx.args.get("k", DEFAULT_K)), _category_of(ctx.args.get("category"))
    return {**ticket, "articles": search_articles(content_of(ticket), k=k, category=category)}


def query_terms(text: str) -> list[str]:
    """The words of ``text`` that can find an article: lower case, no stop words, numbers or PII masks; once each.

    At most MAX_TERMS, the first ones, so a very long message costs a bounded query.
    """
    words = WORD.findall(MASKED.sub(" ", text.lower()))
    kept = (word.split("'")[0] for word in words if word not in STOP_WORDS)
    return list(dict.fromkeys(word for word in kept if len(word) > 1 and word not in STOP_WORDS))[:MAX_TERMS]


def search_articles(query: str, k: int = DEFAULT_K, category: str | None = None) -> list[dict[str, Any]]:
    """The ``k`` enabled articles that best match ``query``, best first; [] when it has no searchable word."""
    terms = query_terms(query)
    if not terms:
        return []
    ranked = _ranked_ids(terms)
    articles = Article.objects.in_bulk([article_id for article_id, _ in ranked])
    scored = [(articles[i], score * _boost(articles[i], category)) for i, score in ranked if i in articles]
    scored.sort(key=lambda pair: -pair[1])
    return [_found(article, score) for article, score in scored[:k]]


def _ranked_ids(terms: list[str]) -> list[tuple[int, float]]:
    """(article id, score) of enabled matching articles, best first; a higher score is better on both vendors."""
    if connection.vendor == "postgresql":
        sql = (
            f"SELECT id, ts_rank_cd({POSTGRES_VECTOR}, query) AS score"
            " FROM skills_article, to_tsquery('english', %s) AS query"
            f" WHERE enabled AND {POSTGRES_VECTOR} @@ query ORDER BY score DESC, id LIMIT %s"
        )
        params: list[Any] = [" | ".join(_distinctive(terms)), CANDIDATES]
    elif connection.vendor == "sqlite":
        weights = ", ".join(str(weight) for weight in SQLITE_WEIGHTS)
        sql = (
            f"SELECT a.id, -bm25({FTS_TABLE}, {weights}) AS score FROM {FTS_TABLE}"
            f" JOIN skills_article a ON a.id = {FTS_TABLE}.rowid"
            f" WHERE {FTS_TABLE} MATCH %s AND a.enabled ORDER BY score DESC, a.id LIMIT %s"
        )
        params = [" OR ".join(f'"{term}"' for term in terms), CANDIDATES]
    else:
        raise SkillError(f"knowledge_search has no full-text search for {connection.vendor}", transient=False)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(int(article_id), float(score)) for article_id, score in cursor.fetchall()]


def _distinctive(terms: list[str]) -> list[str]:
    """The terms found in at most half the enabled articles (all terms when none is); for PostgreSQL."""
    filters = ", ".join(f"count(*) FILTER (WHERE {POSTGRES_VECTOR} @@ to_tsquery('english', %s))" for _ in terms)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*), {filters} FROM skills_article WHERE enabled", terms)
        total, *counts = cursor.fetchone() or (0,)
    kept = [term for term, count in zip(terms, counts, strict=True) if count <= total / 2]
    return kept or terms


def _boost(article: Article, category: str | None) -> float:
    return CATEGORY_BOOST if category is not None and article.category == category else 1.0


def _found(article: Article, score: float) -> dict[str, Any]:
    return {
        "slug": article.slug,
        "title": article.title,
        "category": article.category,
        "score": round(score, 4),
        "text": article.body,
    }


def _k_of(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        message = f"knowledge_search: args.k must be a whole number from 1 to {MAX_K}, not {value!r}"
        raise SkillError(message, transient=False)
    return value


def _category_of(value: Any) -> str | None:
    if value is None or value in ArticleCategory.values:
        return value
    choices = ", ".join(ArticleCategory.values)
    raise SkillError(f"knowledge_search: args.category must be one of {choices}, not {value!r}", transient=False)


def heldout_rows() -> list[dict[str, Any]]:
    """The held-out queries, written as customers write, each ``{"query", "slugs"}`` (the articles that answer it)."""
    lines = HELDOUT_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def search_slugs(query: str, k: int) -> list[str]:
    return [article["slug"] for article in search_articles(query, k=k)]


def evaluate(
    rows: Iterable[dict[str, Any]], k: int = DEFAULT_K, search: Callable[[str, int], list[str]] = search_slugs
) -> dict[str, Any]:
    """Hit rate and mean reciprocal rank at ``k`` of ``search`` (query, k -> slugs, best first) on labelled rows.

    A row hits when one of its ``slugs`` is in the first ``k`` found; its reciprocal rank is 1/rank of the first.
    """
    hits, reciprocal = 0, 0.0
    rows = list(rows)
    for row in rows:
        found = search(row["query"], k)[:k]
        rank = next((i for i, slug in enumerate(found, start=1) if slug in row["slugs"]), None)
        hits += rank is not None
        reciprocal += 1 / rank if rank else 0.0
    n = len(rows)
    return {"n": n, "hit_rate": round(hits / n, 4) if n else 0.0, "mrr": round(reciprocal / n, 4) if n else 0.0}
