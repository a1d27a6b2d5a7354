"""The Django example's WSGI app, plus a query at import time: under
``gunicorn --preload`` that query runs in the master before it forks the
workers, so the master holds an open replicated connection and a running
replicator (it holds the lock) when the workers are born, as an app that
warms a cache at import would. The fork may fall while the master's
replicator is still starting (test_gunicorn.py has a test of that alone).

``GET /fork-check`` (answered here, before Django's request handling, which
would close and reopen the connection) says whether the worker's Django
connection is still the one the master opened.
"""

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection, connections
from exampleproject.wsgi import application as django_application
from items.models import Item

WARM_COUNT = Item.objects.count()
WARM_CONNECTION = connection.connection


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/fork-check":
        return django_application(environ, start_response)
    wrapper = connections["default"]
    inherited = wrapper.connection is not None and wrapper.connection is WARM_CONNECTION
    wrapper.ensure_connection()
    body = json.dumps(
        {
            "pid": os.getpid(),
            "inherited": inherited,
            "usable": wrapper.connection.execute("SELECT 1").fetchone()[0],
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


__all__ = ["WARM_COUNT", "application"]
