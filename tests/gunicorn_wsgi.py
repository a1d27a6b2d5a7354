"""The Django example's WSGI app, plus a query at import time: under
``gunicorn --preload`` that query runs in the master before it forks the
workers, so the master holds an open replicated connection and a running
replicator (it holds the lock) when the workers are born, as an app that
warms a cache at import would.

It waits until the master's replicator runs: a fork while it is still
starting hits an engine issue of its own (see test_gunicorn.py).
"""

import time

from django.db import connection
from exampleproject.wsgi import application
from items.models import Item

import sqlrepl

WARM_COUNT = Item.objects.count()
_deadline = time.monotonic() + 30
while sqlrepl.status(connection.settings_dict["NAME"]).role == "starting" and time.monotonic() < _deadline:
    time.sleep(0.01)

__all__ = ["WARM_COUNT", "application"]
