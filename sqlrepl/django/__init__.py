"""A Django database backend that replicates its SQLite database with sqlrepl.

    DATABASES = {
        "default": {
            "ENGINE": "sqlrepl.django",
            "NAME": BASE_DIR / "db.sqlite3",
            "OPTIONS": {
                "replica": "s3://bucket/prefix",   # or file:///abs/path, or a list
                "durability": "async",             # or "replicated"
                "restore": True,                   # restore at startup when the file is missing
            },
        }
    }
    INSTALLED_APPS = [..., "sqlrepl.django"]   # startup checks and `manage.py sqlrepl`

It is Django's own SQLite backend (or, with ``"backend": "dotted.path"``,
another SQLite backend) whose connections are made by :func:`sqlrepl.connect`.
See :mod:`sqlrepl.django.base` for every option and what it guarantees.

This package imports nothing from Django itself, so that naming it as an
``ENGINE`` or an app costs nothing until Django loads it.
"""
