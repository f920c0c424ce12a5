"""Serving counters: requests by status and mode, guard refusals, pivots seen.

They are exported as Ray metrics (Prometheus, next to Ray Serve's own request and
latency metrics) when running inside Ray, and always kept in-process too so that
tests and ``/healthz`` can read them without a metrics backend.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as _Tally

log = logging.getLogger("r2d.serve")


class ServeMetrics:
    """Request, guard and pivot counters for one ingress replica."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tally: _Tally = _Tally()
        self._ray = _ray_counters()

    def request(self, status: int, mode: str, stream: bool) -> None:
        self._inc("r2d_serve_requests", {"status": str(status), "mode": mode, "stream": str(stream).lower()})

    def guard_refusal(self, reason: str) -> None:
        self._inc("r2d_serve_guard_refusals", {"reason": reason})

    def pivots(self, counts: dict[str, int]) -> None:
        for pivot, n in counts.items():
            if n:
                self._inc("r2d_serve_pivots", {"pivot": pivot}, n)

    def snapshot(self) -> dict[str, int]:
        """Totals keyed ``name{tag=value,...}``."""
        with self._lock:
            return dict(self._tally)

    def total(self, name: str) -> int:
        with self._lock:
            return sum(n for key, n in self._tally.items() if key.split("{", 1)[0] == name)

    def _inc(self, name: str, tags: dict[str, str], n: int = 1) -> None:
        key = name + "{" + ",".join(f"{k}={v}" for k, v in sorted(tags.items())) + "}"
        with self._lock:
            self._tally[key] += n
        counter = self._ray.get(name)
        if counter is not None:
            try:
                counter.inc(n, tags=tags)
            except Exception as err:  # metrics must never fail a request
                log.debug("metric %s not recorded: %s", name, err)


def _ray_counters() -> dict:
    """Ray metric counters when inside a Ray worker; empty otherwise."""
    try:
        import ray
        from ray.util.metrics import Counter

        if not ray.is_initialized():
            return {}
        return {
            "r2d_serve_requests": Counter("r2d_serve_requests", "Chat completion requests.",
                                          tag_keys=("status", "mode", "stream")),
            "r2d_serve_guard_refusals": Counter("r2d_serve_guard_refusals",
                                                "Completions replaced by a refusal in guard mode.",
                                                tag_keys=("reason",)),
            "r2d_serve_pivots": Counter("r2d_serve_pivots", "Pivot tokens generated.", tag_keys=("pivot",)),
        }
    except Exception as err:
        log.debug("Ray metrics unavailable: %s", err)
        return {}
