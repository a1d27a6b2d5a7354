"""A tiny JSON API: ``GET /api/items``, ``POST /api/items``, ``GET /api/status``.

With ``durability="replicated"`` (the example's default) a 201 from
``POST /api/items`` means the item is in the replica, not only on this disk.
"""

import json
import os

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

import sqlrepl

from .models import Item, Tag


@csrf_exempt
def items(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        latest = Item.objects.prefetch_related("tags")[:50]
        return JsonResponse({"count": Item.objects.count(), "items": [i.as_json() for i in latest]})
    if request.method != "POST":
        return JsonResponse({"error": "use GET or POST"}, status=405)
    try:
        body = json.loads(request.body)
        name = str(body["name"])
        tags = [str(t) for t in body.get("tags", [])]
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": 'send JSON like {"name": "...", "tags": ["..."]}'}, status=400)
    if not tags:
        # One INSERT in autocommit mode: the backend waits for the replica after it.
        item = Item.objects.create(name=name)
    else:
        # Several statements in one transaction: the backend waits at its commit.
        with transaction.atomic():
            item = Item.objects.create(name=name)
            item.tags.set([Tag.objects.get_or_create(name=t)[0] for t in tags])
    return JsonResponse(item.as_json(), status=201)


def status(request: HttpRequest) -> JsonResponse:
    """What the replicating process has done, the same from every worker
    (``sqlrepl.read_status`` reads what it publishes; ``sqlrepl status
    db.sqlite3`` shows the same), and this worker's own role."""
    connection.ensure_connection()  # starts this worker's replicator, or its standby
    database = connection.settings_dict["NAME"]
    return JsonResponse(
        {
            "pid": os.getpid(),
            "role": sqlrepl.status(database).role,
            "replication": sqlrepl.read_status(database).as_json(),
        }
    )
