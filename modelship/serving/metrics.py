"""The metrics modelship adds beside TorchServe's: a Prometheus endpoint serving what every worker of a server
counted (prometheus-client's multiprocess mode: each worker writes its counters to ``PROMETHEUS_MULTIPROC_DIR``,
this process sums them per scrape). ``modelship serve`` runs it in TorchServe's process group, on PORT+5.

    python -m modelship.serving.metrics DIR PORT
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    folder, port = argv[0], int(argv[1])
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    main(sys.argv[1:])
