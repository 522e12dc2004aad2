"""The web UI in a real browser: ``twistd llamaswap`` with fake servers, headless Chromium.

Needs Playwright for Python and Debian's Chromium (``/usr/bin/chromium``; Playwright's
own browser download is not used).  Skipped when either is missing, except under CI,
where their absence is a failure.  Leaves ``test-artifacts/ui.png`` (and the daemon's
log) behind for a person to look at.
"""

from __future__ import annotations

import random
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .chromium import Browser, Page, expect, watched_page
from .daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
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
  kept:
    cmd: {FAKE} --model ${{MODEL_ID}} --load-time 0.3
    kvCache: true
"""
SECONDS = 20_000  # ms, for every expectation that waits on a model
expect.set_options(timeout=SECONDS)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    ARTIFACTS.mkdir(exist_ok=True)
    where = tmp_path_factory.mktemp("ui")
    config = where / "config.yaml"
    config.write_text(CONFIG + f"kvCache: {{path: '{where / 'kv'}', minTokens: 1}}\n")
    server = Daemon(config, ARTIFACTS / "ui-twistd.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(browser: Browser, daemon: Daemon) -> Iterator[Page]:
    with watched_page(browser, daemon.base + "/ui/", SECONDS) as (page, _):
        yield page


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
    """Under the strict policy of llamaswap's own pages, its inline start allowed by
    its hash alone: the page needs nothing the policy refuses."""
    context = browser.new_context()
    context.set_default_timeout(SECONDS)
    context.add_init_script(
        "window.__violations = []; document.addEventListener('securitypolicyviolation', "
        "(e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));"
    )
    page = context.new_page()
    answer = page.goto(daemon.base + "/swagger/")
    assert answer is not None
    policies = [
        h["value"] for h in answer.headers_array() if h["name"].lower() == "content-security-policy"
    ]
    assert any("script-src 'self' 'sha256-" in p for p in policies), policies
    expect(page.locator(".opblock").first).to_be_visible()
    expect(page.get_by_role("button", name="post /v1/chat/completions", exact=True)).to_be_visible()
    expect(
        page.locator(".opblock-summary-path", has_text="/api/models/load/{model}")
    ).to_be_visible()
    page.get_by_role("button", name="post /v1/chat/completions", exact=True).click()
    assert page.evaluate("window.__violations") == []
    page.screenshot(path=str(ARTIFACTS / "swagger.png"))
    context.close()


def test_a_phone_sized_screen(page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_test_id("tab-models").click()
    expect(page.get_by_test_id("model-row-alpha")).to_be_visible()
    expect(page.get_by_test_id("load-beta")).to_be_in_viewport()
    page.screenshot(path=str(ARTIFACTS / "ui-phone.png"), full_page=True)


def test_a_conversation_saved_at_a_swap_shows_and_its_follow_up_comes_from_the_cache(
    page: Page, daemon: Daemon
) -> None:
    page.set_viewport_size({"width": 1280, "height": 800})
    page.get_by_test_id("tab-chat").click()
    page.locator("#chat-new").click()
    page.get_by_test_id("chat-model").select_option("kept")
    page.get_by_test_id("chat-input").fill("Tell me about the red box on the third shelf.")
    page.get_by_test_id("chat-send").click()
    expect(page.get_by_test_id("chat-answer")).to_contain_text("fake-reply model=kept")
    expect(page.get_by_test_id("chat-send")).to_have_text("Send")
    page.get_by_test_id("tab-models").click()
    saved = page.get_by_test_id("model-saved-kept")
    expect(saved).to_be_hidden()  # nothing saved while it runs
    daemon.post("/api/models/load/alpha")  # the swap saves kept's slot
    [state] = [s for s in daemon.get("/running")["saved_states"] if s["model"] == "kept"]
    expect(saved).to_be_visible()
    expect(saved).to_contain_text(f"{state['tokens']} tokens")
    expect(saved).to_contain_text(re.compile(r"KiB · \d+s ago"))
    # the follow-up swaps back: restored, so the server finds the history in its cache
    page.get_by_test_id("tab-chat").click()
    page.get_by_test_id("chat-input").fill("And the blue one?")
    page.get_by_test_id("chat-send").click()
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.get_by_test_id("chat-send")).to_have_text("Send")
    page.get_by_test_id("tab-activity").click()
    newest = page.get_by_test_id("activity-table").locator("tbody tr").first
    expect(newest).to_contain_text("kept")
    expect(newest.locator("td[data-label='From cache']")).to_have_text(re.compile(r"^[1-9]"))
    page.get_by_test_id("tab-models").click()
    page.screenshot(path=str(ARTIFACTS / "ui-saved-states.png"))
