"""The app in a real browser (Debian's chromium through Playwright) against `python app.py` on the tiny model.

Every request the pages make is recorded; anything that leaves 127.0.0.1 fails the test (and is blocked).
Screenshots go to tests/artifacts/.

    .venv/bin/python -m pytest tests/test_browser.py
"""
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app_server import ROOT, running_app

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "tests" / "artifacts"
BADGE = re.compile(r"^(😄|😢) LLM 情感判断: (正面|负面) \(置信度 (\d+)%\)")
LOCAL_SCHEMES = {"data", "blob", "about"}
SESSIONS = 8
# Records, in the page, every text the last bot message and the turn status go through.
WATCH = """() => {
  window.__texts = []; window.__status = [];
  const note = () => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    const t = bots.length ? bots[bots.length - 1].innerText : '';
    if (window.__texts[window.__texts.length - 1] !== t) window.__texts.push(t);
    const s = document.querySelector('#turn-status').innerText;
    if (window.__status[window.__status.length - 1] !== s) window.__status.push(s);
  };
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_app(tiny_models["Q4_K_M"], tiny_models["Q4_K_M"].parent, "--n-threads", "1") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium fonts-noto-cjk (or deselect: -m 'not browser')")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, server):
    """open_page() -> a fresh session (own browser context) on the app; no request may leave 127.0.0.1."""
    contexts, outside = [], []

    def route(r):
        url = urlsplit(r.request.url)
        if url.scheme in LOCAL_SCHEMES or url.hostname == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    def open_page():
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        context.route("**/*", route)
        context.on("websocket", lambda ws: outside.append(ws.url) if urlsplit(ws.url).hostname != "127.0.0.1"
                   else None)
        contexts.append(context)
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("#message textarea")
        page.evaluate(WATCH)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not outside, f"requests left 127.0.0.1: {outside}"
    assert server.alive(), server.output()


def send(page, text):
    """Type and press Enter; the in-page records start afresh for this turn."""
    page.evaluate("window.__texts = []; window.__status = []")
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def last_bot_text(page) -> str:
    return page.locator('#chat [data-testid="bot"]').last.inner_text()


def wait_status(page, status, timeout=120_000):
    """Until the turn status has shown `status` after `waiting` since the last send()."""
    page.wait_for_function("s => { const i = window.__status.findIndex(x => x.includes('waiting'));"
                           " return i >= 0 && window.__status.slice(i).some(x => x.includes(s)); }",
                           arg=status, timeout=timeout)


def wait_until(condition, message, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def wait_stable(read, quiet=1.5, timeout=60.0):
    """read() once it has not changed for `quiet` seconds (updates already on the wire may still land)."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "still changing"
        time.sleep(0.1)
        new = read()
        if new != value:
            value, since = new, time.monotonic()
    return value


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def check_badge(text) -> str:
    m = BADGE.match(text)
    assert m, f"no badge at the start of {text!r}"
    emoji, label, percent = m.groups()
    assert emoji == ("😢" if label == "负面" else "😄") and 0 <= int(percent) <= 100
    return label


def test_a_turn_shows_the_badge_then_streams_the_reply_to_the_end(open_page):
    page = open_page()
    send(page, "今天的实验终于成功了，太棒了！")
    wait_status(page, "done")
    texts = page.evaluate("window.__texts").copy()
    final = last_bot_text(page)
    label = check_badge(final)
    reply = BADGE.sub("", final).strip()
    assert reply, "no reply after the badge"
    seen = [t for t in texts if t]
    assert BADGE.match(seen[0]) and not BADGE.sub("", seen[0]).strip(), "the badge did not come first, alone"
    assert len(seen) >= 3, f"the reply did not stream (texts seen: {len(seen)})"
    assert page.evaluate("window.__status")[-1].endswith("done")
    assert page.locator('#chat [data-testid="user"]').all_inner_texts() == ["今天的实验终于成功了，太棒了！"]
    bars = page.locator("#mood .mood-bar")
    assert bars.count() == 1 and bars.first.get_attribute("data-label") == label
    shot(page, "browser-turn.png")

    send(page, "可是明天还要继续加班，好累")  # a second turn: history kept, a second mood bar
    wait_status(page, "done")
    check_badge(last_bot_text(page))
    assert page.locator('#chat [data-testid="bot"]').count() == 2 and bars.count() == 2
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"bot\"]')")
    assert bars.count() == 0


def test_english_labels_give_an_english_badge(open_page):
    page = open_page()
    page.get_by_label("English").check()
    send(page, "What a lovely day!")
    wait_status(page, "done")
    m = re.match(r"^(😄 LLM sentiment: Positive|😢 LLM sentiment: Negative) \(confidence \d+%\)", last_bot_text(page))
    assert m, last_bot_text(page)
    assert page.locator("#mood .mood-bar").first.get_attribute("data-label") in {"Positive", "Negative"}


def test_stop_ends_the_reply_and_the_model_is_free_again(open_page, server):
    page = open_page()
    page.fill("#max-tokens input[type=number]", "512")
    page.press("#max-tokens input[type=number]", "Enter")
    def ended() -> tuple[int, int]:
        out = server.output()
        return out.count("reply stopped after"), out.count("reply finished after")

    # The tiny model writes 512 tokens in a few seconds, so on a busy machine the reply can end before the click
    # lands; then the turn proves nothing about Stop and is tried again (at most 3 times).
    for attempt in range(3):
        before = ended()
        send(page, "给我讲一个很长很长的故事")
        page.wait_for_function("() => window.__texts.some(t => t.includes('%)\\n') && t.split('%)')[1].trim())")
        page.click("#stop")
        wait_status(page, "stopped")
        wait_until(lambda: ended() != before, "the server neither stopped nor finished the reply")
        if ended()[0] > before[0]:
            break
    else:
        pytest.fail("the reply finished before Stop in all 3 tries")
    stopped = wait_stable(lambda: last_bot_text(page))
    check_badge(stopped)
    statuses = page.evaluate("window.__status")
    statuses = statuses[next(i for i, s in enumerate(statuses) if "waiting" in s):]   # this attempt's turn
    assert not any(s.endswith("done") for s in statuses), f"reply finished before Stop: {statuses}"
    shot(page, "browser-stop.png")

    send(page, "那就下次再讲吧")  # the stopped stream must have released the model
    wait_status(page, "done")
    check_badge(last_bot_text(page))
    assert page.locator('#chat [data-testid="bot"]').count() == attempt + 2


def test_switching_the_model_reloads_once(open_page, server, tiny_models):
    page = open_page()
    target = tiny_models["Q8_0"].name
    loads_before = sum(line.startswith("loaded ") for line in server.output().splitlines())
    page.click("#model input")
    page.get_by_role("option", name=re.compile(re.escape(target))).click()
    page.wait_for_function("n => document.querySelector('#model-status').innerText.includes(n)", arg=target,
                           timeout=120_000)
    send(page, "换了模型还能用吗？")
    wait_status(page, "done")
    check_badge(last_bot_text(page))
    shot(page, "browser-switch.png")
    loads = [line for line in server.output().splitlines() if line.startswith("loaded ")]
    assert len(loads) == loads_before + 1 and loads[-1].endswith(target)
    # another session opened now sees the model that is loaded
    other = open_page()       # the page's load event fills in the model that is loaded now
    other.wait_for_function("t => document.querySelector('#model-status').innerText.includes(t)", arg=target,
                            timeout=30_000)
    assert target in other.input_value("#model input")


def test_eight_sessions_at_once_each_get_their_own_turn(open_page, server):
    pages = [open_page() for _ in range(SESSIONS)]
    for page in pages:
        page.fill("#max-tokens input[type=number]", "24")
        page.press("#max-tokens input[type=number]", "Enter")
    texts = [f"会话{i}：今天{topic}" for i, topic in enumerate(
        ["很顺利", "好糟糕", "有点累", "中了奖", "被批评了", "吃到好吃的", "迟到了", "见到老朋友"])]
    for page, text in zip(pages, texts):
        send(page, text)
    for page, text in zip(pages, texts):
        wait_status(page, "done", timeout=600_000)
        assert page.locator('#chat [data-testid="user"]').all_inner_texts() == [text]
        bots = page.locator('#chat [data-testid="bot"]')
        assert bots.count() == 1
        check_badge(bots.first.inner_text())
        assert BADGE.sub("", bots.first.inner_text()).strip()
    shot(pages[0], "browser-sessions.png")
    assert server.alive()



def test_a_message_sent_during_a_reply_is_queued_not_lost(open_page):
    """Issue 13, bug 5: a second message typed 0.3 s after the first, while it is answered, must not vanish."""
    page = open_page()
    page.fill("#max-tokens input[type=number]", "64")
    page.press("#max-tokens input[type=number]", "Enter")
    send(page, "再说一遍好吗？")
    page.wait_for_function("() => window.__texts.some(t => t.includes('%)'))")    # the first turn is running
    time.sleep(0.3)
    page.fill("#message textarea", "我又发了一条。")
    page.press("#message textarea", "Enter")
    users = page.locator('#chat [data-testid="user"]')
    wait_until(lambda: users.all_inner_texts() == ["再说一遍好吗？", "我又发了一条。"],
               f"the second message is not shown: {users.all_inner_texts()}", timeout=10)
    wait_until(lambda: page.locator('#chat [data-testid="bot"]').count() == 2 and
               "done" in page.inner_text("#turn-status"), "the second message was not answered", timeout=120)
    wait_stable(lambda: last_bot_text(page))
    assert users.all_inner_texts() == ["再说一遍好吗？", "我又发了一条。"]
    for bot in page.locator('#chat [data-testid="bot"]').all():
        check_badge(bot.inner_text())
    assert page.input_value("#message textarea") == ""
    shot(page, "browser-queued-message.png")


# The app on the runtime with test_runtime_logic.py's fake backend, whose labels are known: a text of 差 is 负面 at
# > 99 %. The tiny model's labels are random, so they cannot show the wellbeing note on cue.
FAKE_APP = """
import sys
sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]
from test_runtime_logic import FakeBackend
from allinone_gguf import AllInOne
from allinone_gguf.faces import sessions
class KnownLabels(AllInOne):
    backend_class = FakeBackend
sessions.AllInOne = KnownLabels
import app
sys.exit(app.main(sys.argv[1:]))
"""


@pytest.fixture
def known_labels_app(tmp_path):
    """The app (python app.py's main) on the fake backend; yields its URL once it says it is ready."""
    import subprocess
    import sys
    from app_server import READY, free_port
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"")
    port, log = free_port(), tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", FAKE_APP, str(ROOT / "tests"), str(ROOT), "--model", str(model),
                                 "--models-dir", str(tmp_path), "--port", str(port)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while READY not in log.read_text(errors="replace"):      # the app prints it once the port is open
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_three_strongly_negative_messages_bring_the_wellbeing_note_which_can_be_dismissed(browser, known_labels_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    try:
        page = context.new_page()
        page.goto(known_labels_app)
        page.wait_for_selector("#message textarea")
        page.evaluate(WATCH)
        note = page.locator("#wellbeing-note .wellbeing-note")
        for i, text in enumerate(["差差差", "还是差差差", "真的差差差"]):
            assert not note.is_visible(), f"the note showed after {i} messages"
            send(page, text)
            wait_status(page, "done")
        note.wait_for(state="visible")
        assert "第 1、2、3 轮" in note.inner_text() and "负面" not in note.inner_text()
        shot(page, "browser-wellbeing-note.png")
        page.click("#wellbeing-dismiss")
        note.wait_for(state="hidden")
        send(page, "差差差")                       # the alert still holds: dismissed, it stays hidden
        wait_status(page, "done")
        assert not note.is_visible() and page.locator("#mood .mood-bar").count() == 4
    finally:
        context.close()


def test_with_a_key_the_page_asks_for_it_once_then_works(browser, tiny_models):
    """--api-key guards the page too: a browser lands on the login form, and after it the whole app (Gradio's
    config, queue and stream routes) works on the session cookie alone."""
    model = tiny_models["Q4_K_M"]
    with running_app(model, model.parent, "--n-threads", "1", "--api-key", "s3cret") as keyed:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        try:
            page = context.new_page()
            page.goto(keyed.url)
            page.wait_for_selector("#key")
            assert "/login" in page.url
            page.fill("#key", "wrong")
            page.click("#login")
            page.wait_for_selector("text=Wrong key")
            page.fill("#key", "s3cret")
            page.click("#login")
            page.wait_for_selector("#message textarea")
            page.evaluate(WATCH)
            send(page, "今天的实验终于成功了！")
            wait_status(page, "done")
            assert BADGE.match(last_bot_text(page))
            page.screenshot(path=str(ARTIFACTS / "login-then-chat.png"))
        finally:
            context.close()
