"""The second stage of ``classify_intent``: a statistical classifier trained offline from labelled examples.

TF-IDF features into a logistic regression, trained once per process on first use from
``data/intents_train.jsonl``. How to retrain and evaluate it: docs/skills.md, "classify_intent".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from skills.models import Intent

DATA = Path(__file__).resolve().parent / "data"
TRAINING_FILE = DATA / "intents_train.jsonl"
HELDOUT_FILE = DATA / "intents_heldout.jsonl"
# Inverse regularisation: higher sharpens the probabilities (chosen by cross-validation on the training set).
REGULARISATION_C = 20.0


@dataclass(frozen=True)
class Prediction:
    intent: str
    confidence: float


def labelled_rows(path: Path) -> list[dict[str, str]]:
    """The ``{"text", "intent"}`` rows of a JSONL file; ValueError naming the line of a bad one."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or row.get("intent") not in Intent.values:
            raise ValueError(f"{path.name}:{number}: expected {{'text': str, 'intent': one of {Intent.values}}}")
        rows.append({"text": row["text"], "intent": row["intent"]})
    return rows


def build_pipeline() -> Pipeline:
    """The untrained classifier: text in, one of the intents out (with predict_proba)."""
    features = FeatureUnion(
        [
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode")),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        ]
    )
    return Pipeline([("features", features), ("classify", LogisticRegression(C=REGULARISATION_C, max_iter=5000))])


def train(rows: list[dict[str, str]]) -> Pipeline:
    pipeline = build_pipeline()
    pipeline.fit([row["text"] for row in rows], [row["intent"] for row in rows])
    return pipeline


@lru_cache(maxsize=1)
def trained_model() -> Pipeline:
    """The classifier trained on the training file, once per process."""
    return train(labelled_rows(TRAINING_FILE))


def predict(text: str, model: Any = None) -> Prediction:
    """The model's intent for ``text`` and the probability it gives it."""
    model = model if model is not None else trained_model()
    probabilities = model.predict_proba([text])[0]
    best = int(probabilities.argmax())
    return Prediction(intent=str(model.classes_[best]), confidence=round(float(probabilities[best]), 4))
