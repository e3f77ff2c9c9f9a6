"""The chaos suite: fault injection against real processes.

``manage.py chaos`` (the driver) runs each scenario in a child process,
``python -m orchestration.chaos.child NAME``, that owns everything the
scenario starts: its own redis-server, its own database (a fresh SQLite file,
or a private PostgreSQL cluster), and web, workers and beat started from the
Procfile's lines. The child points its own Django settings at that
environment before ``django.setup()``, so the ORM and the Celery app it uses
to observe and to find its victims never see the service's Redis or database.

Modules: ``processes`` starts and stops processes and servers, ``api`` is a
small HTTP client, ``stack`` is one scenario's running service, ``scenarios``
the faults and what each expects, ``outcome`` the figures a scenario reports.
"""
