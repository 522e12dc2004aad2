"""Headless Chromium for the browser tests: Debian's ``/usr/bin/chromium`` through
Playwright (whose own browser download is not used).

Importing this skips the importing test module when either is missing, except under CI,
where their absence is a failure; so test modules take Playwright's names from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        Frame,
        Page,
        Route,
        expect,
        sync_playwright,
    )
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the browser tests: {CHROMIUM} is missing")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)


__all__ = [
    "CHROMIUM",
    "Browser",
    "BrowserContext",
    "Frame",
    "Page",
    "Route",
    "chromium",
    "expect",
    "watched_page",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@contextmanager
def watched_page(
    browser: Browser, url: str, timeout: float, init_script: str | None = None
) -> Iterator[tuple[Page, list[str]]]:
    """A page opened at ``url`` in a context of its own (1280x800, ``init_script`` run
    in every document), and the list of its uncaught errors, which must stay empty
    (a test may add failures of its own to it)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(timeout)
    if init_script is not None:
        context.add_init_script(init_script)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    yield page, errors
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
