"""agentsite settings: every knob comes from the environment (12-factor).

The README's configuration table lists each variable; keep the two in step.
"""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()

DEV_SECRET_KEY = "django-insecure-agentsite-development-key"

DEBUG = env.bool("DEBUG", default=False)
# The key signs sessions, CSRF tokens and password reset links: outside DEBUG a
# missing one, or the development key anyone can read here, is refused.
SECRET_KEY = env.str("SECRET_KEY", default="")
if not DEBUG and SECRET_KEY.strip() in ("", DEV_SECRET_KEY):
    problem = "missing" if not SECRET_KEY.strip() else "the development key"
    raise ImproperlyConfigured(
        f"SECRET_KEY is {problem} and DEBUG is off: set SECRET_KEY to a long random secret of your own "
        "(python -c 'import secrets; print(secrets.token_urlsafe(50))'), or DEBUG=1 for development"
    )
SECRET_KEY = SECRET_KEY if SECRET_KEY.strip() else DEV_SECRET_KEY

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])
# Origins (scheme included) whose unsafe requests CSRF accepts besides the host's own.
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS (production) -----------------------------------------------------
# All off by default, so bin/run and the tests work over plain HTTP on
# loopback; production turns them on (README, "Security"), and
# `manage.py check --deploy` names any that is missing.
# Behind a proxy that terminates TLS, Django sees plain HTTP. The proxy's
# X-Forwarded-Proto is trusted only when asked: without a proxy that sets it,
# a client could send it and pass for HTTPS.
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("USE_X_FORWARDED_PROTO", default=False) else None
)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# Load balancers and orchestrators probe health over plain HTTP inside the
# network; a redirect would read as a failure (or follow to a name they cannot reach).
SECURE_REDIRECT_EXEMPT = env.list("SECURE_REDIRECT_EXEMPT", default=[r"^healthz$", r"^readyz$"])
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "agentsite.apps.AgentsiteConfig",
    "skills",
    "orchestration",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "agentsite.limits.RequestBodyLimitMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "agentsite.urls"
WSGI_APPLICATION = "agentsite.wsgi.application"
ASGI_APPLICATION = "agentsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "agentsite.context_processors.flower",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
# SQLite by default, anything dj-database-url understands via DATABASE_URL.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'agentsite.sqlite3'}"),
}
DB = DATABASES["default"]
if DB["ENGINE"] == "django.db.backends.sqlite3":
    # Several prefork workers write at once. WAL lets readers run beside the
    # writer, IMMEDIATE takes the write lock at BEGIN (so two transactions
    # never deadlock upgrading a read lock), and the busy timeout makes a
    # writer wait for the lock instead of failing with "database is locked".
    DB["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": env.int("SQLITE_BUSY_TIMEOUT", default=30),
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests need a file (not :memory:) so the worker process sees the data.
    db_file = Path(DB["NAME"])
    DB["TEST"] = {"NAME": str(db_file.with_name(f"test-{db_file.name}"))}
# PostgreSQL prepared statements: psycopg prepares a statement a connection
# ran five times, and PostgreSQL then skips parsing and planning it
# (docs/operations.md, "Database"). Off behind a pooler that cannot keep them
# (PgBouncer in transaction mode before 1.21): Django's default, client-side binding.
if DB["ENGINE"] == "django.db.backends.postgresql" and env.bool("DATABASE_PREPARED_STATEMENTS", default=True):
    DB.setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=5)
# Keep connections open across requests and tasks: a connection per task is
# costly on PostgreSQL (docs/operations.md, "Database"). Broken or old
# connections are closed after each task (agentsite/worker.py).
DB["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=600)
# No health check (a SELECT 1, one more round trip) before each request's or
# task's first query: a connection broken by a database restart fails one
# request (503) or one step attempt (retried as the same delivery) and is then replaced.
DB["CONN_HEALTH_CHECKS"] = env.bool("CONN_HEALTH_CHECKS", default=False)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# Logs go to stderr, as text (the message) or as one JSON object per line
# (LOG_FORMAT=json). Inside a step every record carries run_id, step_id and
# skill, and inside a trace its trace_id (agentsite/telemetry.py).
LOG_FORMAT = env.str("LOG_FORMAT", default="text")
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f'LOG_FORMAT must be "text" or "json", not "{LOG_FORMAT}"')
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"step": {"()": "agentsite.telemetry.StepLogFilter"}},
    "formatters": {
        "text": {"()": "agentsite.telemetry.TextFormatter"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["step"]}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
# Tracing reads the standard OTEL_* variables itself (agentsite/telemetry.py):
# on when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT, or
# OTEL_TRACES_EXPORTER=otlp) is set, off otherwise.

# --- Cache (Redis) --------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
# The API's throttles count requests here, so every web process shares the counts.
# A Redis that does not answer holds a request up for seconds at most (the
# throttles then let it through: orchestration/api/throttling.py).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
}

# --- Request limits ---------------------------------------------------------------
# A body larger than this is refused with 413 before anything reads it
# (agentsite/limits.py); Django's own check on the body it reads agrees with it.
REQUEST_MAX_BYTES = env.int("REQUEST_MAX_BYTES", default=1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = REQUEST_MAX_BYTES
# The largest spec and run input, as compact UTF-8 JSON, and the longest message.
SPEC_MAX_BYTES = env.int("SPEC_MAX_BYTES", default=256 * 1024)
RUN_INPUT_MAX_BYTES = env.int("RUN_INPUT_MAX_BYTES", default=256 * 1024)
MESSAGE_MAX_CHARS = env.int("MESSAGE_MAX_CHARS", default=100_000)
# ?page_size= asks for up to this many items per page (more are clamped to it).
API_MAX_PAGE_SIZE = env.int("API_MAX_PAGE_SIZE", default=200)


def throttle_rate(name: str, default: str) -> str | None:
    """A DRF rate such as "100/min" from the environment; empty means no limit."""
    return env.str(name, default=default) or None


# Requests per client to the API (not to pages, probes or /metrics). Generous
# for people and scripts; starting runs costs workers, so it has a budget of its own.
THROTTLE_RATES = {
    "anon": throttle_rate("THROTTLE_ANON_RATE", "60/min"),
    "user": throttle_rate("THROTTLE_USER_RATE", "600/min"),
    "run_create": throttle_rate("THROTTLE_RUN_CREATE_RATE", "60/min"),
}

# --- REST API ---------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "orchestration.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "orchestration.api.pagination.Pagination",
    "DEFAULT_THROTTLE_CLASSES": [
        "orchestration.api.throttling.AnonThrottle",
        "orchestration.api.throttling.UserThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": THROTTLE_RATES,
    # Anonymous clients are told apart by address: trust X-Forwarded-For only
    # from this many proxies in front of the web (0: the peer's address), or a
    # client could pick a fresh identity per request.
    "NUM_PROXIES": env.int("THROTTLE_NUM_PROXIES", default=0),
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "orchestration.api.schema.AutoSchema",
    "EXCEPTION_HANDLER": "orchestration.api.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "agentsite API",
    "DESCRIPTION": "Run AI-agent skill chains as Celery canvases.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # UI assets are served from this process: a user's machine may be offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "orchestration.models.RunStatus",
        "StepStatusEnum": "orchestration.models.StepStatus",
        "MessageRoleEnum": "orchestration.models.MessageRole",
        "OnActiveEnum": "orchestration.models.OnActive",
    },
}

# --- Orchestration --------------------------------------------------------------
# The workflow a message starts when it names neither a workflow nor a spec.
DEFAULT_WORKFLOW = env.str("DEFAULT_WORKFLOW", default="echo")
# No step may have a hard time limit above this (skills declare their own,
# lower, maxima). The broker's visibility timeout is derived from it.
STEP_MAX_TIME_LIMIT = env.int("STEP_MAX_TIME_LIMIT", default=3600)
# Longest wait between two attempts of a step (exponential backoff cap).
STEP_MAX_BACKOFF = env.int("STEP_MAX_BACKOFF", default=300)
SPEC_MAX_STEPS = 200
SPEC_MAX_DEPTH = 10
# A run must end by its deadline (seconds from its start): the workflow's or the
# request's, else the default; no more than the maximum.
RUN_DEFAULT_DEADLINE = env.int("RUN_DEFAULT_DEADLINE", default=3600)
RUN_MAX_DEADLINE = env.int("RUN_MAX_DEADLINE", default=86400)
# The sweeper (celery beat -> agentsite.sweep) runs this often: it fails runs
# past their deadline and re-publishes stalled ones.
SWEEP_INTERVAL = env.int("SWEEP_INTERVAL", default=10)
# A run none of whose steps showed activity for this long is re-published
# (its messages were lost: a Redis restart, a lost publish, a dead worker).
# Longer than the longest retry countdown, so backoff is not cut short.
RUN_STALL_AFTER = env.int("RUN_STALL_AFTER", default=STEP_MAX_BACKOFF + 60)
# A running step whose worker vanished counts as lost this long after its hard
# time limit (the worker would have killed it by then).
STEP_LEASE_GRACE = env.int("STEP_LEASE_GRACE", default=30)
# A step whose worker dies under it this many times is failed, not redelivered.
STEP_MAX_REDELIVERIES = env.int("STEP_MAX_REDELIVERIES", default=3)
# A step that cannot reach the database retries (backoff up to 30 s) this often.
STEP_DB_RETRIES = env.int("STEP_DB_RETRIES", default=40)
# Skill results kept in each worker process (skills/cache.py), besides Redis:
# at most this many, the least recently used going first.
SKILL_CACHE_L1_SIZE = env.int("SKILL_CACHE_L1_SIZE", default=1024)
# How long an Idempotency-Key is remembered (seconds).
IDEMPOTENCY_KEY_TTL = env.int("IDEMPOTENCY_KEY_TTL", default=86400)
# Run event streams (GET /api/runs/{id}/events/) each hold a web thread: at most
# this many per web process (more get 503), each for at most this long (then the
# client resumes with Last-Event-ID), with a keepalive comment this often.
EVENTS_MAX_STREAMS = env.int("EVENTS_MAX_STREAMS", default=2)
EVENTS_STREAM_SECONDS = env.int("EVENTS_STREAM_SECONDS", default=300)
EVENTS_KEEPALIVE_SECONDS = env.int("EVENTS_KEEPALIVE_SECONDS", default=15)
# Completion webhooks (orchestration/webhooks.py): signed with this secret (a
# run may name a webhook only when it is set), each tried at most this often,
# with exponential backoff up to the cap, each attempt within the timeout.
WEBHOOK_SECRET = env.str("WEBHOOK_SECRET", default="")
WEBHOOK_MAX_ATTEMPTS = env.int("WEBHOOK_MAX_ATTEMPTS", default=8)
WEBHOOK_BACKOFF_MAX = env.int("WEBHOOK_BACKOFF_MAX", default=300)
WEBHOOK_TIMEOUT = env.float("WEBHOOK_TIMEOUT", default=10)
# A pending delivery this long past its attempt lost its message: the sweeper sends it again.
WEBHOOK_STALL_AFTER = env.int("WEBHOOK_STALL_AFTER", default=WEBHOOK_BACKOFF_MAX + 60)
# Outbound calls (webhooks) may go to loopback and private networks: only for
# development and tests; in production they would let a user reach internal services.
OUTBOUND_ALLOW_PRIVATE = env.bool("OUTBOUND_ALLOW_PRIVATE", default=False)
# A URL a skill fetches (agentsite.outbound.fetch): the whole exchange within
# this many seconds, redirects included; at most this many redirects, each checked
# like the first URL; a response body no larger than this (bytes).
OUTBOUND_TIMEOUT = env.float("OUTBOUND_TIMEOUT", default=10)
OUTBOUND_MAX_REDIRECTS = env.int("OUTBOUND_MAX_REDIRECTS", default=5)
OUTBOUND_MAX_BYTES = env.int("OUTBOUND_MAX_BYTES", default=1024 * 1024)

# An OpenAI-compatible chat-completions API for the skills that can use one
# (skills/support/llm.py): unset, they answer offline. Each call is given at most
# LLM_TIMEOUT seconds, and always less than its step's soft time limit.
LLM_BASE_URL = env.str("LLM_BASE_URL", default="")
LLM_API_KEY = env.str("LLM_API_KEY", default="")
LLM_MODEL = env.str("LLM_MODEL", default="")
LLM_TIMEOUT = env.float("LLM_TIMEOUT", default=20)

# The sql_query skill (skills/support/sql.py): one read-only SELECT on the DATABASES
# alias SQL_QUERY_DATABASE, over the tables of SQL_QUERY_TABLES only (the demo
# shop's by default), stopped after SQL_QUERY_TIMEOUT seconds, at most
# SQL_QUERY_MAX_ROWS rows kept.
SQL_QUERY_DATABASE = env.str("SQL_QUERY_DATABASE", default="default")
SQL_QUERY_TABLES = env.list(
    "SQL_QUERY_TABLES", default=["shop_customer", "shop_order", "shop_orderitem", "shop_payment"]
)
SQL_QUERY_TIMEOUT = env.float("SQL_QUERY_TIMEOUT", default=5)
SQL_QUERY_MAX_ROWS = env.int("SQL_QUERY_MAX_ROWS", default=100)

# Where people open Flower (the admin links each step's task to it).
FLOWER_URL = env.str("FLOWER_URL", default=f"http://127.0.0.1:{env.int('FLOWER_PORT', default=5555)}/")

# --- Celery -----------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
# django-celery-results keeps the results a chord reads, and every failure, in the
# database (and so in the admin); a step's output is in its Step row.
# Our subclass makes chord fan-in count each header task once, even when a
# redelivered task reports twice (django-celery-results #177).
CELERY_RESULT_BACKEND = "orchestration.results:ChordSafeDatabaseBackend"
CELERY_RESULT_EXTENDED = True
CELERY_CACHE_BACKEND = "default"
# JSON only, both ways: a pickled message is never deserialised.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
# A message is acknowledged only after its task finished, and a task whose
# worker process died is requeued: a crash never silently drops a step.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message at a time per process: long steps don't hold short ones hostage.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Redis redelivers an unacknowledged message after the visibility timeout; it
# must outlast the longest step (and the longest retry countdown) or a slow
# step would run twice.
# A step that cannot reach the database retries after at most this long.
STEP_DB_BACKOFF_MAX = 30
_LONGEST_HOLD = STEP_MAX_TIME_LIMIT + max(STEP_MAX_BACKOFF, STEP_DB_BACKOFF_MAX)
BROKER_VISIBILITY_TIMEOUT = env.int("BROKER_VISIBILITY_TIMEOUT", default=_LONGEST_HOLD + 600)
if BROKER_VISIBILITY_TIMEOUT <= _LONGEST_HOLD:
    raise ImproperlyConfigured(
        f"BROKER_VISIBILITY_TIMEOUT={BROKER_VISIBILITY_TIMEOUT} must exceed STEP_MAX_TIME_LIMIT plus the longest "
        f"retry countdown ({_LONGEST_HOLD}s), or Redis would hand a running step to a second worker"
    )
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": BROKER_VISIBILITY_TIMEOUT}
# A web request waits at most about a second for a broker that is down; the
# run is kept queued and the sweeper publishes it once the broker is back.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
CELERY_BEAT_SCHEDULE = {
    "sweep": {
        "task": "agentsite.sweep",
        "schedule": SWEEP_INTERVAL,
        # Its own queue (a worker started without -Q consumes it too); a sweep
        # that waited longer than the interval is dropped, the next one comes.
        "options": {"queue": "sweep", "expires": SWEEP_INTERVAL},
    },
}
# Survives a broker restart with unacknowledged messages (agentsite/worker.py).
CELERY_WORKER_CONSUMER = "agentsite.worker:Consumer"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# On a lost broker connection, Celery cancels running acks-late tasks, since it
# cannot acknowledge them. A step's pool process is told to finish the step and
# then exit (orchestration/worker.py: StepRequest.cancel), so no step is stopped
# mid-skill. Why it stays on: docs/operations.md, "Why these defaults".
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Defaults for tasks that set nothing; every step signature sets its own.
CELERY_TASK_SOFT_TIME_LIMIT = 300
CELERY_TASK_TIME_LIMIT = 330
CELERY_TASK_DEFAULT_QUEUE = "default"
# No STARTED row per task (a write less per task): a step's own status says it
# is running, and Flower sees it from events (docs/operations.md, "Why these defaults").
CELERY_TASK_TRACK_STARTED = False
# Celery's Django fixup closes every database connection around every task
# unless this is set; with it, a worker process reconnects only every this
# many tasks (plus whenever CONN_MAX_AGE says so, or a query failed).
CELERY_DB_REUSE_MAX = 1000
# Task events (what Flower shows) are sent while a monitor asks for them:
# Flower enables them on every worker when it starts and every few seconds
# after. Always on, they cost a busy worker CPU on every task (docs/operations.md,
# "Why these defaults"). CELERY_WORKER_SEND_TASK_EVENTS=1 turns them on for good.
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=False)
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = TIME_ZONE

# --- Metrics (GET /metrics) ---------------------------------------------------
# Web and worker processes keep their Prometheus counters in files here
# (prometheus_client's multiprocess mode); /metrics adds them all up, so the
# web and workers of one machine must share it (agentsite/metrics.py).
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default=str(VAR_DIR / "prometheus"))
# /metrics answers requests from these networks, and requests bearing the
# token (Authorization: Bearer ...); anyone else gets a 403.
METRICS_ALLOWED_NETWORKS = [
    ip_network(network, strict=False)
    for network in env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1/128"])
]
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# --- Sentry -----------------------------------------------------------------
# Errors only, scrubbed of what users wrote and of secrets (agentsite/sentry.py).
SENTRY_DSN = env.str("SENTRY_DSN", default="")
if SENTRY_DSN:
    from agentsite import sentry

    sentry.start(SENTRY_DSN, environment=env.str("SENTRY_ENVIRONMENT", default="production"))

# Pages log in with Django's own login form (templates/registration/).
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"
