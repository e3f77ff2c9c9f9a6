"""``manage.py eval_support``: how well the offline support agent classifies and retrieves.

Prints intent accuracy (rules and model, no LLM) and retrieval hit rate@k and MRR on the held-out sets of
``skills/support/data/``, using the configured database's rules and articles (run it after ``migrate``).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from skills.support import intent, knowledge


class Command(BaseCommand):
    help = "Print intent accuracy and retrieval hit rate on the held-out sets that ship with the repo."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object")
        parser.add_argument("-k", type=int, default=3, help="retrieval hits count within the top k (default 3)")

    def handle(self, *args: Any, as_json: bool, k: int, **options: Any) -> None:
        figures = evaluate(k)
        self.stdout.write(_as_json(figures) if as_json else _as_text(figures))


def evaluate(k: int = 3) -> dict[str, Any]:
    return {
        "intent": intent.evaluate(intent.heldout_rows()),
        "retrieval": {**knowledge.evaluate(knowledge.heldout_rows(), k=k), "k": k},
    }


def _as_json(figures: dict[str, Any]) -> str:
    return json.dumps(figures, sort_keys=True)


def _as_text(figures: dict[str, Any]) -> str:
    found, retrieval = figures["intent"], figures["retrieval"]
    lines = [
        f"intent accuracy: {found['accuracy']:.3f} on {found['n']} held-out messages",
        *(
            f"  {name:<10} precision {row['precision']:.2f}  recall {row['recall']:.2f}  n {row['n']}"
            for name, row in sorted(found["per_intent"].items())
        ),
        f"retrieval hit rate@{retrieval['k']}: {retrieval['hit_rate']:.3f}, MRR {retrieval['mrr']:.3f} "
        f"on {retrieval['n']} held-out queries",
    ]
    return "\n".join(lines)
