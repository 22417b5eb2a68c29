"""Test-wide settings: offline hub, no network sockets, tiny models on the path."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")):
        return _real_connect(self, address)
    if self.family == socket.AF_UNIX:
        return _real_connect(self, address)
    raise OSError(f"network access blocked in tests (tried {address!r})")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Block every non-loopback connection: medmap must work offline."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield
