"""The web UI in a real browser: ``twistd llamaswap`` with fake servers, headless Chromium.

Needs Playwright for Python and Debian's Chromium (``/usr/bin/chromium``; Playwright's
own browser download is not used).  Skipped when either is missing, except under CI,
where their absence is a failure.  Leaves ``test-artifacts/ui.png`` (and the daemon's
log) behind for a person to look at.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .daemon import free_port, start_twistd

CHROMIUM = "/usr/bin/chromium"

try:
    from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the browser tests: {CHROMIUM} is missing")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
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
FAKE = f"{shlex.quote(sys.executable)} -m llamaswap.testing.fake_server --port ${{PORT}}"
# away from the 5800 other suites' daemons start at: two daemons may probe one port at once
CONFIG = f"""
startPort: {random.randrange(20000, 30000)}
sendLoadingState: true
store: {{path: ':memory:'}}
models:
  alpha:
    cmd: {FAKE} --model ${{MODEL_ID}} --load-time 0.3
    name: First fake
    description: a fake llama-server
    aliases: [first]
  beta:
    cmd: {FAKE} --model ${{MODEL_ID}} --load-time 0.3
  broken:
    cmd: {FAKE} --fail-start 3
"""
SECONDS = 20_000  # ms, for every expectation that waits on a model
expect.set_options(timeout=SECONDS)


class Daemon:
    """``twistd -n llamaswap`` on a free port, its output in test-artifacts/."""

    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(ARTIFACTS / "ui-twistd.log", "w")  # noqa: SIM115
        self.process = start_twistd(config, self.port, self.log)
        deadline = time.monotonic() + 20
        while not self.up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("llamaswap did not come up; see test-artifacts/ui-twistd.log")
            time.sleep(0.05)

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def post(self, path: str) -> object:
        request = urllib.request.Request(self.base + path, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    ARTIFACTS.mkdir(exist_ok=True)
    config = tmp_path_factory.mktemp("ui") / "config.yaml"
    config.write_text(CONFIG)
    server = Daemon(config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser: Browser, daemon: Daemon) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(SECONDS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(daemon.base + "/ui/")
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def test_the_models_tab_lists_every_model(page: Page) -> None:
    expect(page.get_by_test_id("tab-models")).to_have_attribute("aria-current", "page")
    for model in ("alpha", "beta"):
        expect(page.get_by_test_id(f"model-row-{model}")).to_be_visible()
        expect(page.get_by_test_id(f"model-state-{model}")).to_have_text("stopped")
    expect(page.get_by_test_id("model-row-alpha")).to_contain_text("First fake")
    expect(page.get_by_test_id("model-row-alpha")).to_contain_text("first")  # the alias


def test_a_model_that_cannot_start_shows_why(page: Page) -> None:
    page.get_by_test_id("load-broken").click()
    expect(page.get_by_test_id("model-row-broken")).to_contain_text("fake failure")
    expect(page.locator(".toast.error")).to_contain_text("broken")


def test_load_and_unload_buttons(page: Page) -> None:
    page.get_by_test_id("load-alpha").click()
    expect(page.get_by_test_id("model-state-alpha")).to_have_text("ready")
    expect(page.get_by_test_id("model-row-alpha")).to_contain_text("pid ")
    expect(page.get_by_test_id("load-alpha")).to_be_disabled()
    page.get_by_test_id("unload-alpha").click()
    expect(page.get_by_test_id("model-state-alpha")).to_have_text("stopped")
    page.get_by_test_id("load-alpha").click()
    expect(page.get_by_test_id("model-state-alpha")).to_have_text("ready")


def test_the_logs_tab_shows_lines_as_they_are_printed(page: Page, daemon: Daemon) -> None:
    page.get_by_test_id("tab-logs").click()
    view = page.get_by_test_id("log-view")
    expect(view).to_contain_text("[alpha] main: server is listening")  # the history
    expect(view).not_to_contain_text("[beta]")
    daemon.post("/api/models/load/beta")  # swaps alpha out, while the page watches
    expect(view).to_contain_text("[beta] main: server is listening")
    # the models tab noticed the swap too (from /api/events, or by polling)
    page.get_by_test_id("tab-models").click()
    expect(page.get_by_test_id("model-state-beta")).to_have_text("ready")
    expect(page.get_by_test_id("model-state-alpha")).to_have_text("stopped")
    # one source only: its own lines, without the [id] prefix
    page.get_by_test_id("tab-logs").click()
    page.get_by_test_id("log-source").select_option("beta")
    expect(view).to_contain_text("main: server is listening")
    expect(view).not_to_contain_text("[beta]")
    expect(view).not_to_contain_text("alpha")


def test_pause_holds_new_lines_back_until_resumed(page: Page, daemon: Daemon) -> None:
    view = page.get_by_test_id("log-view")
    page.get_by_test_id("log-source").select_option("all")
    expect(view).to_contain_text("[beta] main: server is listening")  # the history again
    goodbyes = view.locator(".line", has_text="cleaning up before exit")
    before = goodbyes.count()
    page.locator("#log-pause").click()
    daemon.post("/api/models/unload/beta")
    expect(page.locator("#log-pause")).to_have_text(re.compile(r"Resume \([1-9]\d* new\)"))
    assert goodbyes.count() == before
    page.locator("#log-pause").click()
    expect(goodbyes).to_have_count(before + 1)
    expect(page.locator("#log-pause")).to_have_text("Pause")


def test_the_playground_streams_an_answer(page: Page) -> None:
    page.get_by_test_id("tab-chat").click()
    page.get_by_test_id("chat-model").select_option("alpha")  # not loaded: progress first
    page.get_by_test_id("chat-input").fill("Say something.")
    page.get_by_test_id("chat-send").click()
    answer = page.get_by_test_id("chat-answer")
    expect(answer).to_contain_text("fake-reply model=alpha")
    expect(page.locator(".reasoning").last).to_contain_text("alpha")
    expect(page.get_by_test_id("chat-send")).to_have_text("Send")  # the stream ended
    # the conversation goes on; chat-answer is always the latest answer
    page.get_by_test_id("chat-input").fill("And again.")
    page.get_by_test_id("chat-input").press("Enter")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator(".msg.user")).to_have_count(2)
    expect(page.get_by_test_id("chat-answer")).to_have_count(1)
    expect(page.locator(".msg.assistant").last.get_by_test_id("chat-answer")).to_contain_text(
        "fake-reply"
    )
    expect(page.get_by_test_id("chat-send")).to_have_text("Send")
    page.screenshot(path=str(ARTIFACTS / "ui.png"))


def test_the_activity_tab_lists_the_requests_made(page: Page) -> None:
    page.get_by_test_id("tab-activity").click()
    expect(page.get_by_test_id("activity-table")).to_contain_text("alpha")
    expect(page.get_by_test_id("activity-table")).to_contain_text("/v1/chat/completions")


def test_swagger_renders_the_operations(browser: Browser, daemon: Daemon) -> None:
    context = browser.new_context()
    context.set_default_timeout(SECONDS)
    page = context.new_page()
    page.goto(daemon.base + "/swagger/")
    expect(page.locator(".opblock").first).to_be_visible()
    expect(page.get_by_role("button", name="post /v1/chat/completions", exact=True)).to_be_visible()
    expect(
        page.locator(".opblock-summary-path", has_text="/api/models/load/{model}")
    ).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "swagger.png"))
    context.close()


def test_a_phone_sized_screen(page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_test_id("tab-models").click()
    expect(page.get_by_test_id("model-row-alpha")).to_be_visible()
    expect(page.get_by_test_id("load-beta")).to_be_in_viewport()
    page.screenshot(path=str(ARTIFACTS / "ui-phone.png"), full_page=True)


def test_an_api_key_is_asked_for_once_then_kept_and_sent(browser: Browser, daemon: Daemon) -> None:
    context = browser.new_context()
    context.set_default_timeout(SECONDS)
    sent: list[str | None] = []

    def guard(route: Route) -> None:
        """Play a server that wants a key, for two of the routes the page reads."""
        key = route.request.headers.get("authorization")
        sent.append(key)
        if key == "Bearer sekrit":
            route.continue_()
        else:
            route.fulfill(status=401, json={"error": {"message": "a key is needed"}})

    context.route("**/v1/models", guard)
    context.route("**/running", guard)
    page = context.new_page()
    page.goto(daemon.base + "/ui/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.locator("#key-input").fill("sekrit")
    dialog.locator("button[value=save]").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_test_id("model-row-alpha")).to_be_visible()
    assert page.evaluate("localStorage.getItem('llamaswap.apiKey')") == "sekrit"
    page.reload()
    expect(page.get_by_test_id("model-row-alpha")).to_be_visible()
    expect(dialog).to_be_hidden()
    assert sent[-1] == "Bearer sekrit"
    assert sent.count(None) == 2  # one 401 each for the first two requests, one dialog
    context.close()
