"""The database router of a read replica (used when ``SQLREPL_FOLLOW`` is set).

Reads go to the ``replica`` alias, a local copy a follower keeps current from
the primary's replica; writes, and migrations, go to ``default``. A read made
right after a write may not see it yet: the copy is up to a sync interval
plus a poll interval behind. Read from ``default`` where that matters
(``Item.objects.using("default")``).
"""

from typing import Any

REPLICA = "replica"
PRIMARY = "default"


class ReplicaRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        return REPLICA

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return PRIMARY

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        # Both aliases hold the same data (one a copy of the other).
        return True

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool:
        # The copy gets its schema from the primary, through the follower.
        return db == PRIMARY
