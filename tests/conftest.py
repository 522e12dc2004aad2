"""Fixtures shared by several test modules (pytest finds them here by name)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium, one per test module (imported here only when a module asks:
    importing ``tests.chromium`` skips a module that cannot run it)."""
    from .chromium import chromium

    with chromium() as started:
        yield started
