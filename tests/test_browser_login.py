"""The web UI's login in a real headless Chromium: ``twistd llamaswap`` with keys.

Needs Playwright and Debian's Chromium, like ``test_browser``.  An admin logs in with a
key, manages models, and logs out; a key with role ``inference`` sees its own models
and no management; the session cookie is HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import random
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .chromium import Browser, BrowserContext, expect
from .daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FAKE = f"{shlex.quote(sys.executable)} -m llamaswap.testing.fake_server --port ${{PORT}}"
ROOT_KEY, BOB_KEY = "sk-root-9f9f", "sk-bob-8e8e"
CONFIG = f"""
startPort: {random.randrange(20000, 30000)}
store: {{path: ':memory:'}}
apiKeys:
  - {{name: root, key: {ROOT_KEY}, role: admin}}
  - {{name: bob, key: {BOB_KEY}, models: [beta]}}
models:
  alpha:
    cmd: {FAKE} --model ${{MODEL_ID}}
  beta:
    cmd: {FAKE} --model ${{MODEL_ID}}
"""
SECONDS = 20_000
expect.set_options(timeout=SECONDS)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    ARTIFACTS.mkdir(exist_ok=True)
    config = tmp_path_factory.mktemp("login") / "config.yaml"
    config.write_text(CONFIG)
    server = Daemon(config, ARTIFACTS / "login-twistd.log")
    yield server
    server.stop()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context()
    context.set_default_timeout(SECONDS)
    yield context
    context.close()


def test_an_admin_logs_in_manages_and_logs_out(context: BrowserContext, daemon: Daemon) -> None:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(daemon.base + "/ui/#models")
    expect(page.get_by_test_id("login-form")).to_be_visible()  # sent to the login page
    page.get_by_test_id("login-key").fill("sk-wrong")
    page.get_by_test_id("login-send").click()
    expect(page.get_by_test_id("login-error")).to_contain_text("not a valid API key")
    assert context.cookies() == []

    page.get_by_test_id("login-key").fill(ROOT_KEY)
    page.get_by_test_id("login-send").click()
    expect(page.get_by_test_id("who")).to_have_text("root")
    assert page.url.endswith("/ui/#models")
    [cookie] = context.cookies()
    assert cookie["name"] == "llamaswap_session"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert ROOT_KEY not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # no script can read it
    assert ROOT_KEY not in page.evaluate("JSON.stringify(localStorage)")
    # the session does what the key may: load a model, read the logs
    page.get_by_test_id("load-alpha").click()
    expect(page.get_by_test_id("model-state-alpha")).to_have_text("ready")
    page.get_by_test_id("tab-logs").click()
    expect(page.get_by_test_id("log-view")).to_contain_text("[alpha]")
    page.screenshot(path=str(ARTIFACTS / "ui-logged-in.png"))

    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("login-form")).to_be_visible()
    page.goto(daemon.base + "/ui/")
    expect(page.get_by_test_id("login-form")).to_be_visible()  # the session is over
    assert not errors, errors


def test_an_inference_key_sees_its_models_and_no_management(
    context: BrowserContext, daemon: Daemon
) -> None:
    page = context.new_page()
    page.goto(daemon.base + "/ui/login.html")
    page.get_by_test_id("login-key").fill(BOB_KEY)
    page.get_by_test_id("login-send").click()
    expect(page.get_by_test_id("who")).to_have_text("bob")
    expect(page.get_by_test_id("model-row-beta")).to_be_visible()
    expect(page.get_by_test_id("model-row-alpha")).to_have_count(0)
    expect(page.get_by_test_id("tab-logs")).to_be_hidden()
    expect(page.get_by_test_id("load-beta")).to_be_hidden()
    # the chat playground works for its model, through the session
    page.get_by_test_id("tab-chat").click()
    page.get_by_test_id("chat-model").select_option("beta")
    page.get_by_test_id("chat-input").fill("hello")
    page.get_by_test_id("chat-send").click()
    expect(page.locator("#chat-log")).to_contain_text("fake-reply")
    # what the server says when the page is made to try more than the key may
    status = page.evaluate("fetch('/api/models/unload', {method: 'POST'}).then((r) => r.status)")
    assert status == 403
