"""Hostile strings in the web UI, in a real headless Chromium: shown as text, never run.

Everything the UI shows that llamaswap does not write itself carries a payload here:
a model's id, name, description, alias and metadata from the config; a GGUF file's
architecture and name in a models folder; a child's stdout (its log lines, a
load-progress ``stage`` in the child protocol) and its model's answers; a failed
start's last output lines (in the 503, the row, the toast, the activity row); a key's
name.  Each payload, if it ever became markup, would set ``window.__pwned``, change the
title or navigate.  The UI's own pages also carry a strict Content-Security-Policy
(nothing inline runs there, should a string ever become markup), which the UI itself
never trips.

Needs Playwright and Debian's Chromium, like ``test_browser``.
"""

from __future__ import annotations

import base64
import json
import random
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from .chromium import Browser, Frame, Page, expect, watched_page
from .daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
SECONDS = 20_000
expect.set_options(timeout=SECONDS)

# each piece, run as script, sets window.__pwned (or leaves the page); ${ } is a
# template literal's hole, and config strings cannot hold it (a macro), so it comes
# only through what a child writes
SCRIPTED = (
    "\"'><img src=x onerror=window.__pwned=1><svg onload=window.__pwned=2>"
    "<script>window.__pwned=3</script><a href=javascript:window.__pwned=4>link</a>"
    "</textarea></title><iframe srcdoc='<script>parent.__pwned=5</script>'>"
    "<style>body{display:none}</style>"
)
PAYLOAD = SCRIPTED + "`${window.__pwned=6}` ${document.title='pwned'}"
CONFIG_PAYLOAD = SCRIPTED + "`$ {document.title='pwned'}`"
LONG = "x" * 20_000
EVIL_ID = "evil\"'><img src=x onerror=window.__pwned=7>"
KEY_NAME = "k\"'><img src=x onerror=window.__pwned=8>"
KEY = "sk-xss-7c7c"
GGUF_NAME = "gg<img src=x onerror=window.__pwned=9>"
STAGE = "cmd_child_to_router:state:" + json.dumps(
    {"state": "loading", "payload": {"stages": [PAYLOAD], "current": PAYLOAD, "value": 0.5}}
)


def b64(text: str) -> str:
    return "b64:" + base64.b64encode(text.encode()).decode()


# a child command whose arguments may hold any string (``${`` too): b64: ones are decoded
DECODE = (
    "import base64, runpy, sys; sys.argv[1:] = [base64.b64decode(a[4:]).decode() "
    "if a.startswith('b64:') else a for a in sys.argv[1:]]; "
    "runpy.run_module('llamaswap.testing.fake_server', run_name='__main__')"
)
FAKE = f"{shlex.quote(sys.executable)} -c {shlex.quote(DECODE)} --port ${{PORT}}"
# a start that fails, its last output the payload (quoted in the 503)
FAIL = (
    f"{shlex.quote(sys.executable)} -c "
    + shlex.quote(
        "import base64, sys; sys.stderr.write(base64.b64decode(sys.argv[1]).decode() + '\\n'); "
        "sys.exit(3)"
    )
    + f" {base64.b64encode((PAYLOAD + LONG).encode()).decode()} ${{PORT}}"
)
EVIL_CMD = " ".join(
    [
        *(FAKE, "--load-time 0.5", "--model", b64(PAYLOAD)),
        *("--say-first", b64(PAYLOAD), "--say-first", b64(STAGE)),
    ]
)


def yaml(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML flow scalar


def config(models_dir: Path) -> str:
    return f"""
startPort: {random.randrange(20000, 30000)}
sendLoadingState: true
store: {{path: ':memory:'}}
modelsDir: [{yaml(str(models_dir))}]
apiKeys:
  - {{name: {yaml(KEY_NAME)}, key: {KEY}, role: admin}}
models:
  {yaml(EVIL_ID)}:
    cmd: {yaml(EVIL_CMD)}
    childProtocol: on
    name: {yaml(CONFIG_PAYLOAD)}
    description: {yaml(CONFIG_PAYLOAD + LONG)}
    aliases: [{yaml("alias" + EVIL_ID)}]
    metadata: {{note: {yaml(CONFIG_PAYLOAD)}}}
  doomed:
    cmd: {yaml(FAIL)}
"""


def write_gguf(path: Path) -> None:
    """A small GGUF file whose header names a hostile architecture and model."""
    arch = "llama<svg onload=window.__pwned=10>"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(PAYLOAD)
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("blk.0.weight", np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    ARTIFACTS.mkdir(exist_ok=True)
    where = tmp_path_factory.mktemp("xss")
    models = where / "models"
    models.mkdir()
    write_gguf(models / f"{GGUF_NAME}.gguf")
    path = where / "config.yaml"
    path.write_text(config(models))
    server = Daemon(path, ARTIFACTS / "xss-twistd.log")
    yield server
    server.stop()


VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@pytest.fixture(scope="module")
def page(browser: Browser, daemon: Daemon) -> Iterator[Page]:
    # VIOLATIONS: what the page's Content-Security-Policy refused (the UI needs none of it)
    login = daemon.base + "/ui/login.html"
    with watched_page(browser, login, SECONDS, VIOLATIONS) as (page, errors):
        page.get_by_test_id("login-key").fill(KEY)
        page.get_by_test_id("login-send").click()
        page.wait_for_url(daemon.base + "/ui/")

        # a payload that navigates leaves the UI's page (a tab is only a new #hash)
        def navigated(frame: Frame) -> None:
            if frame.url.split("#")[0] != daemon.base + "/ui/":
                errors.append(f"navigated to {frame.url}")

        page.on("framenavigated", navigated)
        yield page


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def assert_inert(page: Page, view: str) -> None:
    """No payload ran, nothing it would have made exists, the title is the UI's own."""
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("window.__violations") == []
    assert page.title() == f"llamaswap · {view}"
    injected = page.locator("main img, main svg, main script, main iframe, main style, main a")
    assert injected.count() == 0
    assert page.locator("#toasts img, #toasts svg, header img, header svg").count() == 0


def test_the_ui_pages_forbid_inline_script(page: Page, daemon: Daemon) -> None:
    """Even markup made from a hostile string cannot run: the policy refuses it."""
    for path in ("/ui/", "/ui/login.html", "/ui/app.js"):
        answer = page.request.get(daemon.base + path)
        policies = [
            h["value"]
            for h in answer.headers_array
            if h["name"].lower() == "content-security-policy"
        ]
        assert "frame-ancestors 'self'" in policies
        assert any("script-src 'self';" in p and "default-src 'self'" in p for p in policies)
    extra = "document.querySelector('#models-extra')"
    page.evaluate(f"{extra}.innerHTML = {json.dumps(SCRIPTED)}")
    page.wait_for_function("window.__violations.length >= 1")
    assert page.evaluate("window.__pwned") is None
    page.evaluate(f"{extra}.replaceChildren(); window.__violations = []")


def test_the_models_tab_shows_config_and_gguf_strings_as_text(page: Page) -> None:
    row = page.get_by_test_id(f"model-row-{EVIL_ID}")
    expect(row).to_be_visible()
    expect(row.locator("strong")).to_have_text(EVIL_ID)
    expect(row).to_contain_text(CONFIG_PAYLOAD)  # the name, the description, the metadata
    expect(row).to_contain_text("alias" + EVIL_ID)
    expect(row).to_contain_text(LONG)
    expect(page.locator("#models-body")).to_contain_text("llama<svg onload=window.__pwned=10>")
    expect(page.get_by_test_id(f"model-row-{GGUF_NAME}")).to_be_visible()
    expect(page.get_by_test_id("who")).to_have_text(KEY_NAME)
    assert_inert(page, "models")


def test_a_failed_start_quoting_hostile_output_stays_text(page: Page) -> None:
    page.get_by_test_id("load-doomed").click()
    row = page.get_by_test_id("model-row-doomed")
    expect(row).to_contain_text(PAYLOAD)
    expect(page.locator(".toast.error")).to_contain_text("doomed")
    assert_inert(page, "models")


def test_a_hostile_stage_and_child_output_load_and_answer_as_text(page: Page) -> None:
    page.get_by_test_id("tab-chat").click()
    page.get_by_test_id("chat-model").select_option(EVIL_ID)
    page.get_by_test_id("chat-input").fill(PAYLOAD)  # the user's own words come back too
    page.get_by_test_id("chat-send").click()
    expect(page.get_by_test_id("chat-answer")).to_contain_text(f"fake-reply model={PAYLOAD}")
    expect(page.locator(".msg.user").last).to_have_text(f"You{PAYLOAD}")
    expect(page.get_by_test_id("chat-send")).to_have_text("Send")
    assert_inert(page, "chat")
    # a request for a model that cannot start: its error, in the conversation
    page.get_by_test_id("chat-model").select_option("doomed")
    page.get_by_test_id("chat-input").fill("hello")
    page.get_by_test_id("chat-send").click()
    expect(page.locator(".msg.assistant .err").last).to_contain_text(PAYLOAD)
    assert_inert(page, "chat")


def test_the_logs_tab_shows_hostile_child_lines_as_text(page: Page) -> None:
    page.get_by_test_id("tab-logs").click()
    view = page.get_by_test_id("log-view")
    expect(view).to_contain_text(f"[{EVIL_ID}] {PAYLOAD}")  # its stdout
    expect(view).to_contain_text(f"[doomed] {PAYLOAD}")  # a failed child's stderr
    assert_inert(page, "logs")


RAW_PATH = "\"'><img/src=x/onerror=window.__pwned=11>"


def raw_get(daemon: Daemon, target: str) -> None:
    """GET ``target`` exactly as written (no client escapes it), with the key."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as conn:
        conn.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Authorization: Bearer {KEY}\r\n\r\n".encode()
        )
        while conn.recv(65536):
            pass


def test_the_activity_tab_shows_hostile_paths_models_and_errors_as_text(
    page: Page, daemon: Daemon
) -> None:
    # paths and model names a client chooses
    page.request.post(
        daemon.base + "/v1/chat/completions?q=" + SCRIPTED,
        headers=auth(),
        data=json.dumps({"model": PAYLOAD, "messages": [{"role": "user", "content": "x"}]}),
    )
    page.request.get(daemon.base + "/upstream/doomed/" + SCRIPTED, headers=auth())  # %-encoded
    raw_get(daemon, "/upstream/doomed/" + RAW_PATH)  # as a raw client may send it
    page.get_by_test_id("tab-activity").click()
    table = page.get_by_test_id("activity-table")
    expect(table).to_contain_text(EVIL_ID)
    expect(table).to_contain_text(PAYLOAD)  # the failed start's error
    expect(table).to_contain_text(RAW_PATH)
    assert_inert(page, "activity")
    page.screenshot(path=str(ARTIFACTS / "ui-xss.png"))


def test_every_view_again_after_the_live_events(page: Page) -> None:
    """The event stream repainted rows while other tabs were open: still text."""
    for view in ("models", "logs", "activity", "chat"):
        page.get_by_test_id(f"tab-{view}").click()
        assert_inert(page, view)
