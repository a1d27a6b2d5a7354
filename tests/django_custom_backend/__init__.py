"""A third-party-style SQLite backend, wrapped by sqlrepl in tests via
``OPTIONS["backend"]``."""
