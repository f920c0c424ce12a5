"""Ports for the servers the tests start, chosen where no other process is handed one meanwhile.

A port found by binding port 0 comes from the kernel's ephemeral range, and the kernel hands that range
out to every socket that binds port 0 or connects out: a Ray node's workers, gRPC channels, HTTP
clients. Between choosing the port and the server binding it (seconds, on a busy machine) one of them
can take it: the cluster-path test's tracking server once failed so ("address already in use"). These
ports come from outside the ephemeral range and Ray's worker ports, where the kernel never hands one
out by itself.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = range(10002, 20000)
"""Ray's default ``--min-worker-port`` .. ``--max-worker-port``."""


def ephemeral_ports() -> range:
    """The kernel's ephemeral range (Linux's default where it cannot be read)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A port nothing listens on, outside the ephemeral range and Ray's worker ports where one is."""
    ephemeral = ephemeral_ports()
    candidates = [p for p in range(20000, 65536) if p not in ephemeral and p not in RAY_WORKER_PORTS]
    for port in random.Random().sample(candidates, min(200, len(candidates))):  # seeded by the OS
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every such port is taken, or there are none: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
