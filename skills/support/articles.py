"""The knowledge base's seed articles and its full-text index, shared by migration 0005_article and the tests.

The index is the database's own: an FTS5 table kept by triggers on SQLite, a GIN index over
``POSTGRES_VECTOR`` on PostgreSQL (docs/skills.md, "knowledge_search").
Nothing here registers a skill: a migration may import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.db import connections

DATA_DIR = Path(__file__).with_name("data")
ARTICLES_FILE = DATA_DIR / "articles.json"
FIELDS = ("title", "category", "body", "tags", "enabled")

FTS_TABLE = "skills_article_fts"
# porter: "charged" finds "charge"; unicode61 folds case and accents.
SQLITE_INDEX_SQL = [
    f"""CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(
        title, tags, body, content='skills_article', content_rowid='id', tokenize='porter unicode61')""",
    f"""CREATE TRIGGER IF NOT EXISTS skills_article_fts_insert AFTER INSERT ON skills_article BEGIN
        INSERT INTO {FTS_TABLE}(rowid, title, tags, body) VALUES (new.id, new.title, new.tags, new.body);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS skills_article_fts_delete AFTER DELETE ON skills_article BEGIN
        INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, title, tags, body)
        VALUES ('delete', old.id, old.title, old.tags, old.body);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS skills_article_fts_update AFTER UPDATE ON skills_article BEGIN
        INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, title, tags, body)
        VALUES ('delete', old.id, old.title, old.tags, old.body);
        INSERT INTO {FTS_TABLE}(rowid, title, tags, body) VALUES (new.id, new.title, new.tags, new.body);
    END""",
]
SQLITE_DROP_SQL = [
    "DROP TRIGGER IF EXISTS skills_article_fts_update",
    "DROP TRIGGER IF EXISTS skills_article_fts_delete",
    "DROP TRIGGER IF EXISTS skills_article_fts_insert",
    f"DROP TABLE IF EXISTS {FTS_TABLE}",
]
SQLITE_REBUILD_SQL = f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')"

POSTGRES_VECTOR = (
    "(setweight(to_tsvector('english'::regconfig, title), 'A')"
    " || setweight(to_tsvector('english'::regconfig, tags), 'B')"
    " || setweight(to_tsvector('english'::regconfig, body), 'C'))"
)
# knowledge_search: enabled articles whose vector matches the customer's terms (WHERE POSTGRES_VECTOR @@ query).
POSTGRES_INDEX_SQL = [
    f"CREATE INDEX IF NOT EXISTS skills_article_search_idx ON skills_article USING GIN ({POSTGRES_VECTOR})"
]
POSTGRES_DROP_SQL = ["DROP INDEX IF EXISTS skills_article_search_idx"]


def seed_articles() -> list[dict[str, Any]]:
    """The shop's help-centre articles as the fixture has them (data/articles.json)."""
    articles: list[dict[str, Any]] = json.loads(ARTICLES_FILE.read_text(encoding="utf-8"))
    return articles


def load_articles(article_model: Any, using: str = "default") -> int:
    """Create the seed articles, or put them back as the fixture has them (by slug); returns how many.

    ``article_model``: skills.models.Article or a migration's historical one. Then makes sure of the search index.
    """
    articles = seed_articles()
    for article in articles:
        defaults = {field: article.get(field, True if field == "enabled" else "") for field in FIELDS}
        article_model.objects.using(using).update_or_create(slug=article["slug"], defaults=defaults)
    ensure_search_index(using)
    return len(articles)


def ensure_search_index(using: str = "default") -> None:
    """Create the full-text index if it is missing; on SQLite also rebuild it from the articles table."""
    connection = connections[using]
    statements = {"sqlite": [*SQLITE_INDEX_SQL, SQLITE_REBUILD_SQL], "postgresql": POSTGRES_INDEX_SQL}
    with connection.cursor() as cursor:
        for statement in statements.get(connection.vendor, []):
            cursor.execute(statement)
