"""Shared test set-up."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(autouse=True)
def restore_environment():
    """Restore `os.environ` after each test. Runs inside the pytest process (Lightning, DeepSpeed) set
    MASTER_ADDR / MASTER_PORT and leave a process group whose store listens on that port; a later test that
    launches train.py would inherit the port and fail to bind it. (The group itself stays: DeepSpeed keeps it
    for the next in-process run.)"""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def restore_functional_linear():
    """Restore `torch.nn.functional.linear` after each test: an in-process DeepSpeed ZeRO-3 engine replaces
    it with its own (`zero.Init`'s memory-efficient linear, which "will persist unless manually reset"), and
    a later test that counts what autograd saves would measure DeepSpeed's function instead of torch's."""
    import torch.nn.functional as F

    saved = F.linear
    yield
    F.linear = saved


@pytest.fixture
def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on: tests that start a process group or a store take one
    of their own, so that two of them running side by side (pytest -n 2) never meet on a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
