"""A model server's answer cannot act on llamaswap's origin, in a real headless Chromium.

``twistd llamaswap`` with keys, a fake server and a hostile model server (a few lines
of ``http.server``: its first answer is a ``307`` to ``/api/models/unload``, its
second a ``Set-Cookie`` of an attacker's own session).  An admin signed in to the web UI chats
with the hostile model through the UI's playground.  Before, the browser followed the
307 with the admin's session (every model stopped) and took the cookie (the admin's UI
then ran as the attacker's key).  Needs Playwright and Debian's Chromium, like
``test_browser``.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .chromium import Browser, BrowserContext, expect
from .daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FAKE = f"{shlex.quote(sys.executable)} -m llamaswap.testing.fake_server --port ${{PORT}}"
ADMIN_KEY, USER_KEY = "sk-admin-7a7a", "sk-user-6b6b"
SECONDS = 20_000
expect.set_options(timeout=SECONDS)

HOSTILE = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.answer()

    def answer(self):
        if self.path == "/health":
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        Handler.answered += 1
        if Handler.answered % 2:  # the first chat: a redirect
            self.send_response(307)
            self.send_header("location", "/api/models/unload")
        else:  # the second: a cookie
            with open(sys.argv[2]) as planted:
                token = planted.read().strip()
            self.send_response(200)
            self.send_header("set-cookie", f"llamaswap_session={token}; Path=/; HttpOnly")
        self.send_header("content-length", "0")
        self.end_headers()

Handler.answered = 0

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """The daemon and the file whose session token the hostile server plants."""
    ARTIFACTS.mkdir(exist_ok=True)
    root = tmp_path_factory.mktemp("answers")
    script, token = root / "hostile.py", root / "token"
    script.write_text(HOSTILE)
    token.write_text("none yet")
    hostile = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} ${{PORT}} {token}"
    config = root / "config.yaml"
    config.write_text(
        f"startPort: {random.randrange(40000, 50000)}\n"
        "store: {path: ':memory:'}\n"
        "apiKeys:\n"
        f"  - {{name: boss, key: {ADMIN_KEY}, role: admin}}\n"
        f"  - {{name: mallory, key: {USER_KEY}}}\n"
        "models:\n"
        f"  alpha:\n    cmd: {FAKE} --model ${{MODEL_ID}}\n"
        f"  evil:\n    cmd: {hostile}\n"
        "groups:\n  side:\n    members: [alpha, evil]\n    swap: false\n"
    )
    daemon = Daemon(config, ARTIFACTS / "answers-twistd.log")
    yield daemon, token
    daemon.stop()


def call(daemon: Daemon, path: str, key: str, body: object = None) -> tuple[object, str]:
    """``path`` with ``key``: the answer's JSON and its ``Set-Cookie``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        daemon.base + path,
        data=data,
        method="GET" if data is None else "POST",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer), answer.headers.get("set-cookie", "")


def test_a_model_server_s_answer_neither_redirects_the_ui_nor_sets_its_session(
    context: BrowserContext, world: tuple[Daemon, Path]
) -> None:
    daemon, token = world
    call(daemon, "/api/models/load/alpha", ADMIN_KEY, {})
    # the attacker's own session, which the hostile server will try to plant
    _, cookie = call(daemon, "/api/login", USER_KEY, {"key": USER_KEY})
    token.write_text(cookie.split(";")[0].partition("=")[2])

    page = context.new_page()
    page.goto(daemon.base + "/ui/")
    page.get_by_test_id("login-key").fill(ADMIN_KEY)
    page.get_by_test_id("login-send").click()
    expect(page.get_by_test_id("who")).to_have_text("boss")
    page.get_by_test_id("tab-chat").click()
    page.get_by_test_id("chat-model").select_option("evil")
    for text in ("hello", "hello again"):  # a redirect, then a cookie
        page.get_by_test_id("chat-input").fill(text)
        page.get_by_test_id("chat-send").click()
        expect(page.get_by_test_id("chat-send")).to_have_text("Send")  # the request ended
        running, _ = call(daemon, "/running", ADMIN_KEY)
        states = {entry["model"]: entry["state"] for entry in running["running"]}  # type: ignore[index]
        assert states.get("alpha") == "ready", (text, states)  # nothing unloaded it
    who = page.evaluate("async () => (await fetch('/api/session')).json()")
    assert who["name"] == "boss", who  # still the admin's own session
    [session] = [c for c in context.cookies() if c["name"] == "llamaswap_session"]
    assert session["value"] != token.read_text()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context()
    made.set_default_timeout(SECONDS)
    yield made
    made.close()
