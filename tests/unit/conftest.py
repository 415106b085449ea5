"""The in-process tier: a test here starts no program (no subprocess, no launcher, no server).

Tests that need one live in tests/integration. The check wraps each test's call: starting a program
through ``subprocess`` (what every launcher, tool and server start goes through) fails the test.
A DataLoader's worker processes are forks of this interpreter, not programs, and stay allowed.
"""

from __future__ import annotations

import subprocess

import pytest


class StartsAProgram(AssertionError):
    pass


def pytest_sessionstart(session):
    # Importing torch.cuda looks a library up with ctypes (``ldconfig -p``): part of an import, not a
    # program a test starts. Done once here, so whichever test imports it first is not refused for it.
    import torch.cuda  # noqa: F401


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    original = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):
        raise StartsAProgram(
            f"{item.nodeid} starts {args!r}: a test that starts a program belongs in tests/integration"
        )

    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original
