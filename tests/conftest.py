"""Session-wide test setup."""

from __future__ import annotations

import os
import sys

import pytest

_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # TVM's runtime can crash while the interpreter tears down its static objects after a run
    # that loaded compiled libraries (exit 139 with every test passed). Once pytest has reported
    # everything, leave without that teardown, keeping pytest's own exit status.
    if "tvm" in sys.modules and _status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status[-1])
