"""Shared workflows every installation starts with."""

from __future__ import annotations

from typing import Any

from django.db import migrations

WORKFLOWS = {
    "echo": {
        "description": "Answers a message with its own content (the default workflow).",
        "spec": {"skill": "echo", "id": "reply"},
    },
    "fan-out": {
        "description": "A chord: three echo steps in parallel, then one that receives all their outputs.",
        "spec": {
            "chord": {
                "header": [
                    {"skill": "echo", "args": {"value": "a"}},
                    {"skill": "echo", "args": {"value": "b"}},
                    {"skill": "echo", "args": {"value": "c"}},
                ],
                "body": {"skill": "echo"},
            }
        },
    },
}


def create(apps: Any, schema_editor: Any) -> None:
    Workflow = apps.get_model("orchestration", "Workflow")
    for name, fields in WORKFLOWS.items():
        Workflow.objects.get_or_create(name=name, defaults=fields)


def remove(apps: Any, schema_editor: Any) -> None:
    apps.get_model("orchestration", "Workflow").objects.filter(name__in=WORKFLOWS, owner=None).delete()


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0001_initial")]
    operations = [migrations.RunPython(create, remove)]
