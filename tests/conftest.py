"""Fixtures shared by several test modules (pytest finds them here by name)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

from .daemon import Daemon

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium, one per test module (imported here only when a module asks:
    importing ``tests.chromium`` skips a module that cannot run it)."""
    from .chromium import chromium

    with chromium() as started:
        yield started


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test against a ``daemon`` shows the end of that daemon's log."""
    report = yield
    daemon = getattr(item, "funcargs", {}).get("daemon")
    if report.failed and isinstance(daemon, Daemon):
        report.sections.append(("llamaswap's log, last lines", daemon.tail()))
    return report
