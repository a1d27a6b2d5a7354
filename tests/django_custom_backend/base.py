"""Like many SQLite backends in the wild: Django's, plus a function and a
pragma on every new connection, and its own features class."""

from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper
from django.db.backends.sqlite3.features import DatabaseFeatures as SQLiteFeatures


class DatabaseFeatures(SQLiteFeatures):
    custom_backend_marker = True


class DatabaseWrapper(SQLiteDatabaseWrapper):
    features_class = DatabaseFeatures

    def get_new_connection(self, conn_params):
        conn = super().get_new_connection(conn_params)
        conn.create_function("custom_backend_answer", 0, lambda: 42)
        conn.execute("PRAGMA cache_size = -2345")
        return conn
