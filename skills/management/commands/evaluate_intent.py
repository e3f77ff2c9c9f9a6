"""``manage.py evaluate_intent``: how classify_intent's offline stages do on the held-out examples.

    python manage.py evaluate_intent [--threshold 0.5]

Runs the rules in this database, then the model trained from
skills/support/data/intents_train.jsonl, on skills/support/data/intents_heldout.jsonl
(no LLM) and prints the report of ``skills.support.intent.evaluate`` as JSON.
Run it after editing the training data or the rules.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from skills.support.intent import DEFAULT_MIN_CONFIDENCE, evaluate, heldout_rows


class Command(BaseCommand):
    help = "Evaluate classify_intent (rules + model, no LLM) on the held-out examples; prints JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--threshold", type=float, default=DEFAULT_MIN_CONFIDENCE, help="min_confidence")

    def handle(self, *args: Any, threshold: float, **options: Any) -> None:
        self.stdout.write(json.dumps(evaluate(heldout_rows(), threshold=threshold), indent=2))
