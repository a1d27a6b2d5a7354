"""The ``sqlrepl.django`` app: checks the settings of every database using
the backend at ``django.setup()``, and provides ``manage.py sqlrepl``."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["SqlreplConfig"]


class SqlreplConfig(AppConfig):  # type: ignore[misc]  # Django ships no type information
    """Add ``"sqlrepl.django"`` to ``INSTALLED_APPS`` to have bad sqlrepl
    settings stop the process at startup (``ImproperlyConfigured``) instead
    of failing at the first query, and for ``manage.py sqlrepl``."""

    name = "sqlrepl.django"
    label = "sqlrepl"
    verbose_name = "sqlrepl replication"

    def ready(self) -> None:
        from .base import check_databases

        check_databases()
