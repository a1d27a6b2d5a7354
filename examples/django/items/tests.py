"""Tests of the example API, run by Django's test runner (``manage.py test``):
the test database is in memory and never replicated, even though the
settings name a replica."""

import sqlite3

from django.db import connection
from django.test import TestCase, override_settings

import sqlrepl

from .models import Item


# Without the read replica's router (SQLREPL_FOLLOW): the tests check the
# app against one database; the replica alias's test database is empty.
@override_settings(DATABASE_ROUTERS=[])
class ItemsApiTests(TestCase):
    def test_create_and_list(self) -> None:
        """POST creates an item (with tags, in one transaction) and GET lists it."""
        created = self.client.post(
            "/api/items", {"name": "milk", "tags": ["shop"]}, content_type="application/json"
        )
        assert created.status_code == 201
        assert created.json()["tags"] == ["shop"]
        listed = self.client.get("/api/items").json()
        assert listed["count"] == 1
        assert listed["items"][0]["name"] == "milk"

    def test_bad_json_is_rejected(self) -> None:
        """A body without a name is a 400 and creates nothing."""
        response = self.client.post("/api/items", "{}", content_type="application/json")
        assert response.status_code == 400
        assert Item.objects.count() == 0


class TestDatabaseTests(TestCase):
    def test_test_database_is_not_replicated(self) -> None:
        """The test runner's in-memory database gets a plain sqlite3 connection."""
        connection.ensure_connection()
        assert isinstance(connection.connection, sqlite3.Connection)
        assert not isinstance(connection.connection, sqlrepl.Connection)
        assert connection.is_in_memory_db()
