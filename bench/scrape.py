"""A Prometheus stand-in for the benchmarks: ``python -m bench.scrape PORT``
GETs ``http://127.0.0.1:PORT/metrics`` once a second until its stdin closes,
then prints how many scrapes succeeded (and carried sqlrepl's series)."""

from __future__ import annotations

import sys
import threading
import urllib.request


def main() -> None:
    url = f"http://127.0.0.1:{int(sys.argv[1])}/metrics"
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    scrapes = 0
    while not stop.wait(1.0):  # the scrape interval
        with urllib.request.urlopen(url, timeout=10) as response:
            if b"sqlrepl_replica_txid" in response.read():
                scrapes += 1
    print(scrapes, flush=True)


if __name__ == "__main__":
    main()
