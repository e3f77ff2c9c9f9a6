from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from agentsite import telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")

# Before the application loads its middleware: Django's instrumentation adds one.
telemetry.start_web_tracing()
application = get_wsgi_application()
