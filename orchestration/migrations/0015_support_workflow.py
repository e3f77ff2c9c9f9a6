"""The shared ``support`` workflow: the offline customer-support agent (README, docs/skills.md).

mask_pii -> classify_intent -> a switch on the route -> per route, a chord of
[knowledge_search, sentiment] into compose_reply, then escalate_to_human ->
quality_check. Complaints always go to a person; an uncertain intent (route
"escalate", the default case) or an angry customer does too.
The spec is written out here, not imported, so this migration stays as it was.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

NAME = "support"
DESCRIPTION = (
    "Customer support: masks PII, classifies the intent, answers from the knowledge base "
    "(an LLM when configured, else extractively) and asks a person to review complaints, "
    "uncertain intents and angry customers; then scores the reply."
)


def answer(route: str, category: str | None = None, **review: Any) -> dict[str, Any]:
    """The steps of one route: search and sentiment at once, a reply from both, a person's review if needed."""
    search_args: dict[str, Any] = {"k": 3}
    if category:
        search_args["category"] = category
    return {
        "chain": [
            {
                "chord": {
                    "header": [
                        {"skill": "knowledge_search", "id": f"{route}.search", "args": search_args},
                        {"skill": "sentiment", "id": f"{route}.sentiment"},
                    ],
                    "body": {"skill": "compose_reply", "id": f"{route}.reply"},
                }
            },
            {"skill": "escalate_to_human", "id": f"{route}.review", "args": review},
        ]
    }


SPEC = {
    "chain": [
        {"skill": "mask_pii", "id": "mask"},
        {"skill": "classify_intent", "id": "intent"},
        {
            "switch": {
                "on": "route",
                "cases": {
                    "billing": answer("billing", "billing"),
                    "technical": answer("technical", "technical"),
                    "faq": answer("faq"),
                    "sales": answer("sales", "sales"),
                    "complaint": answer("complaint", always=True, reason="complaint"),
                    "general": answer("general"),
                },
                # "escalate" (an uncertain intent) and anything new: answered, then reviewed.
                "default": answer("unsure"),
            }
        },
        {"skill": "quality_check", "id": "quality"},
    ]
}


def create(apps: Any, schema_editor: Any) -> None:
    Workflow = apps.get_model("orchestration", "Workflow")
    Workflow.objects.get_or_create(name=NAME, owner=None, defaults={"description": DESCRIPTION, "spec": SPEC})


def remove(apps: Any, schema_editor: Any) -> None:
    apps.get_model("orchestration", "Workflow").objects.filter(name=NAME, owner=None).delete()


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0014_run_followed")]
    operations = [migrations.RunPython(create, remove)]
