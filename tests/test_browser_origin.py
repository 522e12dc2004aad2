"""A web page on another origin, in a real headless Chromium, cannot use llamaswap.

``twistd llamaswap`` with fake servers on one local port; the pages that try are served
by a second web server on other ports (``127.0.0.1:<other>`` is another origin of the
same site; ``localhost:<other>`` is another site).  Afterwards the daemon's own state
says what happened.  Needs Playwright and Debian's Chromium, like ``test_browser``.
"""

from __future__ import annotations

import random
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .chromium import Browser, Page, expect
from .daemon import Daemon, free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FAKE = f"{shlex.quote(sys.executable)} -m llamaswap.testing.fake_server --port ${{PORT}}"
SECONDS = 20_000

ATTACK = """<!doctype html>
<title>cute cats</title>
<img src="{target}/unload">
<iframe name="sink"></iframe>
<form id="form" method="POST" action="{target}/api/models/load/beta" target="sink"></form>
<a id="link" href="{target}/ui/">the llamaswap UI</a>
<script>
  fetch("{target}/v1/chat/completions", {{
    method: "POST",
    mode: "no-cors",
    headers: {{"content-type": "text/plain"}},
    body: JSON.stringify({{model: "alpha", messages: [{{role: "user", content: "hi"}}]}}),
  }});
  document.getElementById("form").submit();
</script>
"""

APP = """<!doctype html>
<title>a chat app the operator allowed</title>
<script>
  window.answer = fetch("{target}/v1/chat/completions", {{
    method: "POST",
    headers: {{"content-type": "application/json"}},
    body: JSON.stringify({{model: "alpha", messages: [{{role: "user", content: "hi"}}]}}),
  }}).then((r) => r.json()).then((j) => j.choices[0].message.content);
</script>
"""


class Site:
    """A second web server: serves ``directory`` on ``127.0.0.1:port``."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/") is not None, "the second site")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def running(daemon: Daemon) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in daemon.get("/running")["running"]}


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            body: bytes = answer.read()
            return body
    except OSError:
        return None


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 20
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int, int]]:
    """The daemon, the port of the attacker's site and the port of an allowed app."""
    ARTIFACTS.mkdir(exist_ok=True)
    root = tmp_path_factory.mktemp("origins")
    attack_port, app_port = free_port(), free_port()
    config = root / "config.yaml"
    config.write_text(
        f"startPort: {random.randrange(30000, 40000)}\n"
        "store: {path: ':memory:'}\n"
        f"cors: {{allowOrigins: ['http://127.0.0.1:{app_port}']}}\n"
        f"models:\n  alpha:\n    cmd: {FAKE} --model ${{MODEL_ID}}\n"
        f"  beta:\n    cmd: {FAKE} --model ${{MODEL_ID}}\n"
    )
    daemon = Daemon(config, ARTIFACTS / "origin-twistd.log")
    pages = root / "site"
    pages.mkdir()
    (pages / "attack.html").write_text(ATTACK.format(target=daemon.base))
    (pages / "app.html").write_text(APP.format(target=daemon.base))
    sites = [Site(pages, attack_port), Site(pages, app_port)]
    yield daemon, attack_port, app_port
    for site in sites:
        site.stop()
    daemon.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(SECONDS)
    yield context.new_page()
    context.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["other-port", "other-site"])
def test_a_page_elsewhere_unloads_loads_and_runs_nothing(
    world: tuple[Daemon, int, int], page: Page, host: str
) -> None:
    daemon, attack_port, _ = world
    daemon.post("/api/models/load/alpha")
    before = daemon.get("/api/activity")["total"]
    assert running(daemon) == {"alpha": "ready"}

    ended: dict[str, int | None] = {}  # path → status (None: the browser dropped the answer)

    def record(url: str, status: int | None) -> None:
        if url.startswith(daemon.base):
            ended.setdefault(url.removeprefix(daemon.base), status)

    page.on("response", lambda r: record(r.url, r.status))
    # Chromium's ORB drops the JSON answer to an <img> (after it came): no "response"
    page.on("requestfailed", lambda r: record(r.url, None))
    page.goto(f"http://{host}:{attack_port}/attack.html")
    paths = {"/unload", "/v1/chat/completions", "/api/models/load/beta"}
    deadline = time.monotonic() + 20
    while not paths <= set(ended) and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert paths <= set(ended), ended
    assert ended["/v1/chat/completions"] == 403
    assert ended["/api/models/load/beta"] == 403
    # nothing was unloaded, loaded, or run
    assert running(daemon) == {"alpha": "ready"}
    assert daemon.get("/api/activity")["total"] == before
    # the page may still link to the UI, which then works (its requests are its own)
    page.locator("#link").click()
    expect(page.get_by_test_id("model-state-alpha")).to_have_text("ready")
    expect(page.get_by_test_id("model-state-beta")).to_have_text("stopped")


def test_an_allowed_origin_s_app_can_call_and_read(
    world: tuple[Daemon, int, int], page: Page
) -> None:
    _, _, app_port = world
    page.goto(f"http://127.0.0.1:{app_port}/app.html")
    answer = page.evaluate("window.answer")
    assert "fake-reply model=alpha" in answer


MODEL_PAGE = """<!doctype html>
<title>a page a model server sent</title>
<script>
  document.title = "its script ran";
  const request = new XMLHttpRequest();
  request.open("POST", "/api/models/unload", false);  // synchronous: done before "load"
  request.send();
</script>
"""


def test_a_model_server_s_page_runs_no_script_as_llamaswap(tmp_path: Path, page: Page) -> None:
    """What a model's server sends (its web UI, a page /cors-proxy fetched, a hostile
    server's page) is shown through llamaswap, but never as one of llamaswap's pages."""
    ARTIFACTS.mkdir(exist_ok=True)
    pages = tmp_path / "site"
    pages.mkdir()
    (pages / "page.html").write_text(MODEL_PAGE)
    site = Site(pages, free_port())
    config = tmp_path / "config.yaml"
    config.write_text(
        f"startPort: {random.randrange(30000, 40000)}\n"
        "store: {path: ':memory:'}\n"
        f"models:\n  alpha:\n    cmd: {FAKE} --model ${{MODEL_ID}}\n"
        f"  hostile:\n    cmd: sleep 600\n    proxy: http://127.0.0.1:{site.port}\n"
        "    checkEndpoint: none\n"
        "groups:\n  both:\n    members: [alpha, hostile]\n    swap: false\n"
    )
    daemon = Daemon(config, ARTIFACTS / "model-page-twistd.log")
    try:
        daemon.post("/api/models/load/alpha")
        page.goto(daemon.base + "/upstream/hostile/page.html")
        assert page.title() == "a page a model server sent"  # shown, its script not run
        assert running(daemon) == {"alpha": "ready", "hostile": "ready"}
    finally:
        daemon.stop()
        site.stop()
