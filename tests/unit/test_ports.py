"""The test servers' ports: outside the kernel's ephemeral range and Ray's worker ports, and free."""

import socket

from ports import RAY_WORKER_PORTS, ephemeral_ports, free_port


def test_free_port_is_bindable_and_outside_the_ranges_others_are_handed():
    ephemeral = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn at random: parallel sessions pick apart
    for port in ports:
        assert port not in ephemeral and port not in RAY_WORKER_PORTS and 20000 <= port < 65536
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_returned(monkeypatch):
    """With the only candidate (20000) taken, the kernel's choice comes back, never the taken port."""
    import ports

    monkeypatch.setattr(ports, "ephemeral_ports", lambda: range(20001, 65536))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 20000))
        port = free_port()
        assert port != 20000
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
