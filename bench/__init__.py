"""sqlrepl's benchmark harness: no replication vs Litestream vs sqlrepl.

Run ``python -m bench --quick`` for a smoke run; see docs/benchmarks.md.
"""
