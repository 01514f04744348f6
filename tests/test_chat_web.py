"""`mlx-kto chat --web`: the page in a real headless Chromium (send, stream, rate,
undo) and the Host/Origin guard with plain HTTP requests."""

import http.client
import json
import os
import shutil
import threading
import time

from mlx_kto.collect.session import ChatSession, Sampling, default_model, load_chat_model
from mlx_kto.collect.web.server import bind, create_app
from mlx_kto.data.feedback import read_ratings
from mlx_kto.data.rows import load_examples

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, port, session) of a web chat on the shipped demo model, in a thread."""
    import uvicorn

    fb = tmp_path_factory.mktemp("web") / "feedback.jsonl"
    model, tok = load_chat_model(default_model(), None)
    session = ChatSession(
        model,
        tok,
        model_name="demo",
        feedback=fb,
        system_prompt="Be polite.",
        sampling=Sampling(temp=1.0, max_tokens=24, seed=0),
    )
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(session, port), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", port, session
    srv.should_exit = True
    thread.join(timeout=10)


def request(port, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    out = r.status, r.read().decode()
    conn.close()
    return out


def test_page_and_info_are_served(server):
    _, port, _ = server
    status, body = request(port, "GET", "/")
    assert status == 200 and '<script src="/app.js">' in body
    status, body = request(port, "GET", "/api/info")
    assert status == 200 and json.loads(body)["system_prompt"] == "Be polite."


@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "localhost.evil.example:{port}", "127.0.0.1:1", "127.0.0.1", ""]
)
def test_foreign_host_is_rejected(server, host):
    """DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends its own
    name as Host."""
    _, port, _ = server
    status, body = request(port, "GET", "/api/ratings", {"Host": host.format(port=port)})
    assert status == 403 and "Host" in body


def test_localhost_and_ip_literal_hosts_are_accepted(server):
    _, port, _ = server
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/api/ratings", {"Host": host})[0] == 200


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://127.0.0.1:1", "null", "https://127.0.0.1:{port}"]
)
def test_cross_site_post_is_rejected(server, origin):
    _, port, session = server
    n = len(read_ratings(session.feedback))
    body = {"reply_id": "x", "label": True}
    status, text = request(port, "POST", "/api/rate", {"Origin": origin.format(port=port)}, body)
    assert status == 403 and "Origin" in text
    assert len(read_ratings(session.feedback)) == n


def test_post_without_origin_or_json_is_rejected(server):
    _, port, _ = server
    assert request(port, "POST", "/api/undo", {}, {"rating_id": "x"})[0] == 403
    own = {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "text/plain"}
    assert request(port, "POST", "/api/undo", own, {"rating_id": "x"})[0] == 400


def test_unknown_reply_and_bad_label_are_refused(server):
    _, port, _ = server
    own = {"Origin": f"http://127.0.0.1:{port}"}
    status, text = request(port, "POST", "/api/rate", own, {"reply_id": "nope", "label": True})
    assert status == 404 and "no such reply" in text
    status, _ = request(
        port, "POST", "/api/reply", own, {"messages": [{"role": "system", "content": "x"}]}
    )
    assert status == 400
    assert request(port, "GET", "/etc/passwd")[0] == 404
    assert request(port, "GET", "/static/../../pyproject.toml")[0] == 404


def _chromium():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e .[test])")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,800",
    ):
        opts.add_argument(flag)
    import tempfile

    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='mlx_kto_chromium_')}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def test_browser_chat_stream_rate_and_undo(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, session = server
    before = {r["id"] for r in read_ratings(session.feedback)}
    driver = _chromium()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(base + "/")
        wait.until(lambda d: "demo" in d.find_element(By.ID, "info").text)
        # Count how many times the streaming bubble's text grows (streamed, not all at once).
        driver.execute_script(
            "window.__pieces = 0; new MutationObserver((ms) => { for (const m of ms)"
            " if (m.target.closest && m.target.closest('.msg.assistant.streaming')) window.__pieces++; })"
            ".observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"
        )
        driver.find_element(By.ID, "input").send_keys("What color is the sea?")
        driver.find_element(By.ID, "send").click()
        reply = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant.done")))
        text = reply.find_element(By.CLASS_NAME, "text").text
        assert text.strip()
        assert driver.execute_script("return window.__pieces") >= 2
        reply.find_element(By.CSS_SELECTOR, "button.up").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "saved: thumbs up"))
        assert "active" in reply.find_element(By.CSS_SELECTOR, "button.up").get_attribute("class")
        driver.save_screenshot(str(tmp_path / "chat.png"))

        new = [r for r in read_ratings(session.feedback) if r["id"] not in before]
        assert len(new) == 1
        row = new[0]
        assert row["label"] is True
        assert row["completion"] == [{"role": "assistant", "content": text}]
        assert row["prompt"] == [
            {"role": "system", "content": "Be polite."},
            {"role": "user", "content": "What color is the sea?"},
        ]
        assert row["meta"]["sampling"]["temp"] == 1.0 and row["meta"]["model"] == "demo"
        (ex,) = [e for e in load_examples(session.feedback) if e.completion[0]["content"] == text]
        assert ex.label is True

        # The ratings view lists it; undo retracts it (and training no longer sees it).
        item = wait.until(
            EC.presence_of_element_located((By.CSS_SELECTOR, f'#ratings li[data-id="{row["id"]}"]'))
        )
        assert text in item.text
        item.find_element(By.CSS_SELECTOR, "button.undo").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "rating undone"))
        assert row["id"] not in {r["id"] for r in read_ratings(session.feedback)}
        assert driver.find_elements(By.CSS_SELECTOR, f'#ratings li[data-id="{row["id"]}"]') == []
        assert "active" not in reply.find_element(By.CSS_SELECTOR, "button.up").get_attribute(
            "class"
        )
        assert json.loads(session.feedback.read_text().splitlines()[-1])["retract"] == row["id"]

        # Regenerate replaces the latest reply (same prompt); it is the only one offering it.
        reply.find_element(By.CSS_SELECTOR, "button.regen").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done") and (
            d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[0].get_attribute("data-reply-id")
            != row["meta"]["reply"]))  # fmt: skip
        (reply,) = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")
        first_text = reply.find_element(By.CLASS_NAME, "text").text
        # History: the second turn's prompt carries the first exchange.
        driver.find_element(By.ID, "input").send_keys("What is the opposite of loud?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
        assert reply.find_elements(By.CSS_SELECTOR, "button.regen") == []
        second = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[1]
        second.find_element(By.CSS_SELECTOR, "button.down").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "saved: thumbs down"))
        # History: a reload keeps the conversation and each reply's rating state.
        driver.refresh()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .msg .text")]
        assert texts[0] == "What color is the sea?" and texts[1] == first_text
        second = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[1]
        assert "active" in second.find_element(By.CSS_SELECTOR, "button.down").get_attribute(
            "class"
        )
        last = read_ratings(session.feedback)[-1]
        assert last["label"] is False
        assert last["prompt"] == [
            {"role": "system", "content": "Be polite."},
            {"role": "user", "content": "What color is the sea?"},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": "What is the opposite of loud?"},
        ]
    finally:
        driver.quit()
