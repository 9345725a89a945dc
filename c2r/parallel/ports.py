"""A free TCP port for a process group's rendezvous (``MASTER_PORT``) on this host."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS reports free on 127.0.0.1 now. Another process could take it before the caller binds it: a short
    window, acceptable for one-host jobs and tests (multi-host launchers choose ``MASTER_PORT`` themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
