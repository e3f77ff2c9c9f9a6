"""The Celery app: configured from Django settings (CELERY_*), tasks found in the installed apps.

Worker signal handlers are connected by the app that owns them, in its AppConfig.ready().
"""

from __future__ import annotations

import os

from celery import Celery

from agentsite.broker import use_for_redis_urls

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")

use_for_redis_urls()
app = Celery("agentsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
