"""An opt-in guard for tests that must never download: a module that imports the fixture
(``from _network import no_network``) has every test in it fail on any attempt to open a
connection. Not in conftest.py, so that tests which need no guard are left alone."""
from __future__ import annotations

import socket

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (a download) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
