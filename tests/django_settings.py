"""Django settings for the subprocesses of tests/test_django.py: the example
project's settings, with ``DATABASES["default"]`` taken from the
``SQLREPL_TEST_DATABASE`` variable (JSON). An ``OPTIONS["factory"]`` string
names a class of this module."""

import json
import os
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "django"))

from exampleproject.settings import *  # noqa: F403


class MarkedConnection(sqlite3.Connection):
    """A user's own connection class, passed as OPTIONS["factory"]."""

    marked = True


DATABASES = {"default": json.loads(os.environ["SQLREPL_TEST_DATABASE"])}
_options = DATABASES["default"].setdefault("OPTIONS", {})
if isinstance(_options.get("factory"), str):
    _options["factory"] = globals()[_options["factory"]]
if os.environ.get("SQLREPL_TEST_REPLICA_DATABASE"):
    # A second alias (a read replica, in tests/test_django_follow.py).
    DATABASES["replica"] = json.loads(os.environ["SQLREPL_TEST_REPLICA_DATABASE"])
if os.environ.get("SQLREPL_TEST_NO_APP"):
    INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "sqlrepl.django"]  # noqa: F405
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"sqlrepl": {"handlers": ["console"], "level": "INFO"}},
}
