"""Readiness from the outside: a server is ready once /healthz says a real generation succeeded."""

from __future__ import annotations

import time


def wait_ready(base: str, timeout_s: float = 600.0) -> float:
    """Poll ``/healthz`` until the first real generation has succeeded; return the seconds waited."""
    import httpx

    started = time.time()
    while time.time() - started < timeout_s:
        try:
            if httpx.get(f"{base}/healthz", timeout=30).status_code == 200:
                return time.time() - started
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base} was not ready after {timeout_s:.0f} s")
