"""Settings of the sqlrepl example project.

The database replicates to ``./replica`` (a folder) by default. Environment
variables change that:

- ``SQLREPL_DB``: the database file (default ``./db.sqlite3``)
- ``SQLREPL_REPLICA``: the replica URL, e.g. ``s3://bucket/prefix`` with the
  usual ``AWS_*`` variables (default ``file://<this folder>/replica``)
- ``SQLREPL_DURABILITY``: ``replicated`` (default: a write is acknowledged
  once it is in the replica) or ``async``
- ``SQLREPL_SYNC_INTERVAL``: seconds between uploads (default 1)
- ``SQLREPL_FOLLOW``: a replica URL to follow: adds a ``replica`` alias (a
  read replica, ``OPTIONS["follow"]``) and a router that sends reads there and
  writes to ``default``
- ``SQLREPL_FOLLOW_DB``: the read replica's file (default
  ``replica-copy.sqlite3`` beside the database)
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-not-secret-sqlrepl-example")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "sqlrepl.django",
    "items",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "exampleproject.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "exampleproject.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "sqlrepl.django",
        "NAME": os.environ.get("SQLREPL_DB", BASE_DIR / "db.sqlite3"),
        "OPTIONS": {
            "replica": os.environ.get("SQLREPL_REPLICA", f"file://{BASE_DIR / 'replica'}"),
            "durability": os.environ.get("SQLREPL_DURABILITY", "replicated"),
            "restore": True,
            "options": {"sync_interval": float(os.environ.get("SQLREPL_SYNC_INTERVAL", "1.0"))},
            # Django's own SQLite options pass through untouched.
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA synchronous=NORMAL",
        },
    }
}

if os.environ.get("SQLREPL_FOLLOW"):
    DATABASES["replica"] = {
        "ENGINE": "sqlrepl.django",
        "NAME": os.environ.get(
            "SQLREPL_FOLLOW_DB", Path(DATABASES["default"]["NAME"]).resolve().parent / "replica-copy.sqlite3"
        ),
        "OPTIONS": {
            "follow": os.environ["SQLREPL_FOLLOW"],
            "poll_interval": 1.0,
            "follow_timeout": 60,  # at the first query, wait this long for the copy
            "timeout": 20,
        },
    }
    DATABASE_ROUTERS = ["exampleproject.routers.ReplicaRouter"]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"sqlrepl": {"handlers": ["console"], "level": os.environ.get("SQLREPL_LOG_LEVEL", "INFO")}},
}
