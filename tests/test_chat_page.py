"""Specification of the chat page of ``llm serve`` (llm/web/, served by llm/api_server.py): its files and headers,
the API key and ``--no-ui``, checked in-process; then the page itself driven in headless Chromium (selenium and
Debian's ``chromium-driver``): streaming from a real server, the stop and new-chat buttons, text that spells
HTML shown as characters, the server's refusals shown as messages, and the README's screenshot.

The browser tests skip, saying why, where Chromium, chromedriver or selenium is missing (``.ci/run`` installs
them). ``LLM_SCREENSHOTS=docs/images`` writes the README's picture (``chat-page.png``) there as well, and
``LLM_CHAT_PAGE_MODEL=<export folder>`` serves that model instead of the untrained one (the README's picture: a
2-layer model of these characters trained for 700 steps on play-shaped conversations of ``helpers.WORDS``)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner

from llm.config import ModelConfig, ServeLimits
from llm.data.tokenizer import CharTokenizer, load_tokenizer
from llm.inference.batching import EngineFull, EngineStopped, Event
from llm.model.checkpoint import save_checkpoint
from llm.model.gpt import GPT

from helpers import IdleEngineLifecycle, widen_weights

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "llm" / "web"
KEY = "page-s3cret"
# the tiny model's characters: enough for prompts that spell HTML
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"<>/=()-\n")
XSS_REPLY = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
XSS_PROMPT = '<img src=x onerror="window.pwned = 3"> and <script>window.pwned = 4</script>'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    tokenizer = CharTokenizer(CHARS)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=256, n_layer=1, n_head=2, d_model=32)
    torch.manual_seed(3)
    return save_checkpoint(tmp_path_factory.mktemp("page") / "checkpoint", widen_weights(GPT(config), 0.3), config,
                           tokenizer)


class ScriptedEngine(IdleEngineLifecycle):
    """Stands in for the engine: answers every request with ``reply`` at once, or as ``mode`` says: "endless"
    sends its tokens again and again, one every 10 ms from a thread of its own, until the request is cancelled;
    "full" and "stopped" refuse it (the queue is full, the engine is not running)."""

    def __init__(self, checkpoint: Path, reply: str = "well met"):
        self.tokenizer, self.context_length = load_tokenizer(checkpoint / "tokenizer"), 256
        self.reply, self.mode, self.running, self.prompts = reply, "reply", False, []
        self.cancelled = threading.Event()  # set when an endless answer is cancelled

    def submit(self, prompt_ids, params, *, on_event, deadline=None):
        if self.mode == "full":
            raise EngineFull("full")
        if self.mode == "stopped" or not self.running:
            raise EngineStopped("stopped")
        self.prompts.append(list(prompt_ids))
        if self.mode == "endless":
            return self._endless(on_event)
        for token_id in self.tokenizer.encode(self.reply):
            on_event(Event(token_id=token_id))
        on_event(Event(finish_reason="stop"))
        return type("Job", (), {"cancel": lambda self: None})()

    def _endless(self, on_event):
        cancel = threading.Event()
        self.cancelled.clear()

        def decode() -> None:
            ids = self.tokenizer.encode(self.reply + " ")
            step = 0
            while not cancel.wait(0.01):
                on_event(Event(token_id=ids[step % len(ids)]))
                step += 1
            on_event(Event(finish_reason="cancelled"))
            self.cancelled.set()

        threading.Thread(target=decode, daemon=True).start()
        return type("Job", (), {"cancel": lambda self: cancel.set()})()


def _served(engine: ScriptedEngine, api_key: str | None = None, **limits):
    from llm.api_server import Served, allowed_hosts

    return Served(engine, "tiny", ServeLimits(**limits), api_key, allowed_hosts("127.0.0.1"))


def _client(engine: ScriptedEngine, *, ui: bool = True, api_key: str | None = None, **limits):
    from fastapi.testclient import TestClient

    from llm.api_server import create_app

    return TestClient(create_app(_served(engine, api_key, **limits), ui=ui), base_url="http://127.0.0.1:8000")


# --- in-process: files, headers, key, --no-ui ------------------------------------------------------------------


def test_the_page_loads_without_a_key_under_a_policy_that_runs_only_its_own_script(checkpoint):
    with _client(ScriptedEngine(checkpoint), api_key=KEY, max_tokens=300, default_max_tokens=50) as app:
        page = app.get("/")
        files = {path: app.get(path) for path in ("/ui/chat.js", "/ui/chat.css", "/ui/icon.svg")}
        config = app.get("/ui/config.json")
        refused = app.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe" not in policy and page.headers["x-content-type-options"] == "nosniff"
    assert page.text == (WEB / "chat.html").read_text()
    assert {path: r.status_code for path, r in files.items()} == dict.fromkeys(files, 200)
    assert files["/ui/chat.js"].headers["content-type"].startswith("text/javascript")
    assert files["/ui/chat.js"].text == (WEB / "chat.js").read_text()
    # the page learns the limits and that a key is needed, never the key
    assert config.json() == {"model": "tiny", "api_key_required": True, "max_tokens": 300, "default_max_tokens": 50,
                             "max_request_bytes": 1 << 20, "context_length": 256, "max_prompt_tokens": 256}
    assert KEY not in config.text
    assert refused.status_code == 401  # the API itself still needs the key


def test_the_page_loads_nothing_from_elsewhere_and_never_writes_html():
    html = (WEB / "chat.html").read_text()
    script = (WEB / "chat.js").read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(links) == ["ui/chat.css", "ui/chat.js", "ui/icon.svg"]  # relative: no CDN, works under a prefix
    assert "<script>" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "localStorage"):
        assert sink not in script, sink
    assert 'fetch("v1/chat/completions"' in script and '"Content-Type": "application/json"' in script


def test_no_ui_turns_the_page_off_and_keeps_the_api(checkpoint):
    with _client(ScriptedEngine(checkpoint), ui=False) as app:
        statuses = {path: app.get(path).status_code for path in ("/", "/ui/chat.js", "/ui/config.json")}
        health = app.get("/health")
        answer = app.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
    assert statuses == {"/": 404, "/ui/chat.js": 404, "/ui/config.json": 404}
    assert health.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "well met"


def test_llm_serve_passes_no_ui_to_the_server(monkeypatch):
    import llm.api_server
    from llm.cli import app

    calls = []
    monkeypatch.setattr(llm.api_server, "run_server", lambda model, **kwargs: calls.append(kwargs["ui"]))
    runner = CliRunner()
    assert runner.invoke(app, ["serve", "--model", "x", "--no-ui"]).exit_code == 0
    assert runner.invoke(app, ["serve", "--model", "x"]).exit_code == 0
    assert calls == [False, True]


def test_the_page_answers_only_the_allowed_host_names(checkpoint):
    with _client(ScriptedEngine(checkpoint)) as app:
        rebound = app.get("/", headers={"Host": "attacker.example"})
        local = app.get("/", headers={"Host": "localhost:8000"})
    assert rebound.status_code == 421 and local.status_code == 200


def test_the_built_wheel_ships_the_page(tmp_path):
    """The page is package data: a wheel built from pyproject.toml holds every file of llm/web/."""
    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(ROOT / "llm", source / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("gpt_mlops-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"llm/web/{p.name}" for p in WEB.iterdir() if p.is_file()} <= names


# --- in headless Chromium ----------------------------------------------------------------------------------------

# nothing beyond 127.0.0.1 resolves or connects (Chromium never proxies loopback): a page that needed a CDN breaks
OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9"]


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no Chromium: apt-get install chromium chromium-driver (or set CHROMIUM)"
    if not shutil.which("chromedriver"):
        return "no chromedriver: apt-get install chromium-driver"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,760",
                 "--hide-scrollbars", *OFFLINE_FLAGS):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_url(checkpoint, tmp_path_factory):
    """A real ``llm serve`` over the tiny model's export (or ``LLM_CHAT_PAGE_MODEL``'s), allowing long answers."""
    from llm.inference.export import export_onnx

    export = os.environ.get("LLM_CHAT_PAGE_MODEL")
    if not export:
        export = tmp_path_factory.mktemp("page-onnx") / "onnx"
        export_onnx(checkpoint, export, verify=False)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "llm", "serve", "--model", str(export), "--port", str(port),
                             "--threads", "1", "--model-name", "tiny", "--max-tokens", "100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"llm serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise AssertionError("llm serve did not answer /health within 60 s")


@pytest.fixture(scope="module")
def scripted(checkpoint):
    """An in-process server (uvicorn on a thread) with a scripted engine whose reply spells HTML, an API key and
    4 KiB request bodies: yields (url, engine)."""
    import uvicorn

    from llm.api_server import create_app

    engine = ScriptedEngine(checkpoint, reply=XSS_REPLY)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(_served(engine, KEY, max_request_bytes=4096)), host="127.0.0.1",
                                           port=port, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the in-process server did not start"
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _open(driver, url: str) -> None:
    driver.get(f"{url}/")
    driver.get_log("browser")  # start each test with an empty console
    _wait(driver, lambda: driver.find_element("id", "status").text == "Ready.", "the page to be ready")


def _wait(driver, condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    shown = driver.find_element("id", "messages").text
    raise AssertionError(f"timed out waiting for {what}; status: {driver.find_element('id', 'status').text!r}, "
                         f"conversation: {shown[-500:]!r}, console: {driver.get_log('browser')}")


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "message")
    driver.execute_script("arguments[0].value = arguments[1]", box, text)  # typing 5000 keys takes seconds
    box.send_keys(Keys.ENTER)


def _texts(driver, selector: str) -> list[str]:
    return driver.execute_script(f"return [...document.querySelectorAll({selector!r})].map(e => e.textContent)")


def _idle(driver) -> bool:
    return driver.find_element("id", "status").text == "Ready." and driver.find_element("id", "send").is_enabled()


def _console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allowed)]


@pytest.mark.slow
def test_the_page_chats_with_a_real_server_and_logs_no_errors(browser, live_url, tmp_path):
    """A real ``llm serve``: the settings reach it, the answer shows, and the README's screenshot is taken."""
    _open(browser, live_url)
    assert browser.find_element("id", "model").text == "tiny"
    assert not browser.find_element("id", "key-row").is_displayed()  # the server has no key
    _set(browser, "system", "You are JULIET. Answer in character.")
    _set(browser, "temperature", "0")  # greedy: the tiny model's answer is the same every run
    _set(browser, "max-tokens", "60")
    _send(browser, "Wherefore art thou, Romeo?")
    _wait(browser, lambda: _idle(browser) and len(_texts(browser, ".message.assistant .text")) == 1, "an answer")
    (first,) = _texts(browser, ".message.assistant .text")
    assert first and _texts(browser, ".message.user .text") == ["Wherefore art thou, Romeo?"]
    _send(browser, "And then?")
    _wait(browser, lambda: _idle(browser) and len(_texts(browser, ".message.assistant .text")) == 2, "an answer")
    shot = tmp_path / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LLM_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["LLM_SCREENSHOTS"]) / "chat-page.png")
    assert _console_errors(browser) == []


def test_tokens_stream_in_and_stop_ends_a_long_answer(browser, scripted):
    url, engine = scripted
    _open(browser, url)
    _set(browser, "api-key", KEY)
    engine.mode = "endless"
    _send(browser, "Tell me everything.")
    lengths = []
    deadline = time.monotonic() + 20
    while len(set(lengths)) < 5 and time.monotonic() < deadline:
        lengths.append(len((_texts(browser, ".message.assistant .text") + [""])[0]))
        time.sleep(0.03)
    assert len(set(lengths)) >= 5 and lengths == sorted(lengths), lengths  # the text grows, piece by piece
    assert browser.find_element("id", "stop").is_enabled() and not browser.find_element("id", "send").is_enabled()
    browser.find_element("id", "stop").click()
    _wait(browser, lambda: _idle(browser), "the stream to end")
    assert engine.cancelled.wait(10), "the server did not cancel the stopped answer"
    (stopped,) = _texts(browser, ".message.assistant .text")
    time.sleep(0.3)
    assert _texts(browser, ".message.assistant .text") == [stopped] and len(stopped) >= max(lengths)
    assert ((XSS_REPLY + " ") * (1 + len(stopped) // len(XSS_REPLY))).startswith(stopped)
    assert _texts(browser, ".notice")[-1] == "Stopped."

    # the page stays usable: the next message is answered, then New chat empties the conversation
    engine.mode = "reply"
    _send(browser, "And now?")
    _wait(browser, lambda: _idle(browser) and len(_texts(browser, ".message.assistant .text")) == 2, "an answer")
    assert _texts(browser, ".message.assistant .text")[1] == XSS_REPLY
    assert len(engine.prompts[-1]) > len(engine.prompts[-2])  # the stopped answer is part of the conversation
    browser.find_element("id", "new-chat").click()
    assert _texts(browser, "#messages > *") == []
    assert _console_errors(browser) == []


def test_text_that_spells_html_shows_as_characters(browser, scripted):
    url, engine = scripted
    engine.mode = "reply"
    _open(browser, url)
    assert browser.find_element("id", "key-row").is_displayed()
    _set(browser, "api-key", KEY)
    _send(browser, XSS_PROMPT)
    _wait(browser, lambda: _idle(browser) and _texts(browser, ".message.assistant .text"), "the answer")
    assert _texts(browser, ".message.user .text") == [XSS_PROMPT]
    assert _texts(browser, ".message.assistant .text") == [XSS_REPLY]
    assert browser.execute_script("return document.querySelectorAll('#messages img, #messages script').length") == 0
    assert browser.execute_script("return window.pwned") is None
    assert _console_errors(browser) == []


def test_the_servers_refusals_show_as_messages_and_the_page_stays_usable(browser, scripted):
    url, engine = scripted
    _open(browser, url)
    browser.execute_script("sessionStorage.clear()")
    _set(browser, "api-key", "wrong-key")
    refusals = {}
    for case, mode, text in (("401", "reply", "hello"), ("429", "full", "hello"), ("503", "stopped", "hello"),
                             ("413", "reply", "x" * 5000)):
        if case == "429":
            _set(browser, "api-key", KEY)
        engine.mode = mode
        before = len(_texts(browser, ".notice.error"))
        _send(browser, text)
        _wait(browser, lambda: len(_texts(browser, ".notice.error")) > before, f"the {case} message")  # noqa: B023
        refusals[case] = _texts(browser, ".notice.error")[-1]
        # the unanswered message goes back into the box, and the conversation shows nothing of it
        assert browser.find_element("id", "message").get_attribute("value") == text
        assert _texts(browser, ".message") == [] and _idle(browser)
    assert "API key" in refusals["401"] and "busy" in refusals["429"] and "not running" in refusals["503"]
    assert "4096 bytes" in refusals["413"]
    assert browser.execute_script("return sessionStorage.getItem('llm-api-key')") == KEY
    assert KEY not in browser.current_url
    engine.mode = "reply"
    _send(browser, "hello")
    _wait(browser, lambda: _idle(browser) and _texts(browser, ".message.assistant .text"), "the answer")
    assert _texts(browser, ".message.assistant .text") == [XSS_REPLY]
    # the refused requests are in the console as failed loads, nothing else is
    assert _console_errors(browser, allowed=("status of 401", "status of 429", "status of 503")) == []


def test_a_conversation_longer_than_the_context_leaves_out_its_oldest_turns(browser, scripted):
    url, engine = scripted
    engine.mode = "reply"
    _open(browser, url)
    _set(browser, "api-key", KEY)
    asked = [f"question {n}: " + " ".join(["wherefore"] * 5) for n in range(4)]
    for n, text in enumerate(asked):
        _send(browser, text)
        _wait(browser, lambda n=n: _idle(browser) and len(_texts(browser, ".message.assistant .text")) == n + 1,
              f"answer {n}")
    # each exchange is about 140 tokens of the 256 the server takes: the page left out the oldest turns
    tokenizer = engine.tokenizer
    last = tokenizer.decode(engine.prompts[-1])
    assert len(engine.prompts[-1]) <= 256 and asked[-1] in last and asked[0] not in last
    assert any(n.startswith("The oldest 2 messages were left out") for n in _texts(browser, ".notice"))
    assert len(_texts(browser, ".message.user .text")) == 4  # the page still shows the whole conversation
    assert _console_errors(browser, allowed=("status of 400",)) == []
