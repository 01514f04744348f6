"""`mlx-kto chat --web --adapter-path RUN --port 0`, launched as a user launches it
(the README's step 3): the page in a real headless Chromium (send, stream, rate up and
down, undo, reload), the feedback file it wrote trains, and the Host/Origin guard with
plain HTTP requests to the same process."""

import http.client
import json
import os
import shutil

from mlx_kto.data.feedback import read_ratings
from mlx_kto.data.rows import load_examples

import pytest
from chat_procs import DEMO_MODEL, WebChat, demo_adapter, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


class Server:
    def __init__(self, chat: WebChat, feedback, run):
        self.chat, self.feedback, self.run = chat, feedback, run
        self.base, self.port = chat.base, chat.port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The web chat with a trained adapter, as a subprocess; stopped with Ctrl-C."""
    run = demo_adapter(tmp_path_factory)
    work = tmp_path_factory.mktemp("web")
    fb = work / "feedback.jsonl"
    args = ["--adapter-path", run, "--feedback", fb, "--system-prompt", "Be polite."]
    chat = WebChat(args + ["--temp", "1.0", "--max-tokens", "24", "--seed", "0"], cwd=work)
    yield Server(chat, fb, run)
    rc = chat.stop()
    assert "Traceback" not in chat.stderr, chat.stderr
    assert rc == 0, chat.stderr  # Ctrl-C is how a user stops it: a normal exit


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
    port = server.port
    status, body = request(port, "GET", "/")
    assert status == 200 and '<script src="/app.js">' in body
    status, body = request(port, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200 and info["system_prompt"] == "Be polite."
    assert info["adapter"] == str(server.run)


@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "localhost.evil.example:{port}", "127.0.0.1:1", "127.0.0.1", ""]
)
def test_foreign_host_is_rejected(server, host):
    """DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends its own
    name as Host."""
    port = server.port
    status, body = request(port, "GET", "/api/ratings", {"Host": host.format(port=port)})
    assert status == 403 and "Host" in body


def test_localhost_and_ip_literal_hosts_are_accepted(server):
    port = server.port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/api/ratings", {"Host": host})[0] == 200


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://127.0.0.1:1", "null", "https://127.0.0.1:{port}"]
)
def test_cross_site_post_is_rejected(server, origin):
    port = server.port
    n = len(read_ratings(server.feedback))
    body = {"reply_id": "x", "label": True}
    status, text = request(port, "POST", "/api/rate", {"Origin": origin.format(port=port)}, body)
    assert status == 403 and "Origin" in text
    assert len(read_ratings(server.feedback)) == n


def test_post_without_origin_or_json_is_rejected(server):
    port = server.port
    assert request(port, "POST", "/api/undo", {}, {"rating_id": "x"})[0] == 403
    own = {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "text/plain"}
    assert (
        request(port, "POST", "/api/undo", own, {"rating_id": "x"})[0] == 415
    )  # Unsupported Media Type


def test_unknown_reply_and_bad_label_are_refused(server):
    port = server.port
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


def _active(el, cls):
    from selenium.webdriver.common.by import By

    return "active" in el.find_element(By.CSS_SELECTOR, f"button.{cls}").get_attribute("class")


@pytest.mark.slow  # headless Chromium on a web chat process: ~12 s
def test_browser_chat_stream_rate_and_undo(server, tmp_path):
    """Send, stream, rate up then down (one live rating), undo, regenerate, a second
    turn, reload (the conversation and rating states survive, rating still works),
    then `mlx-kto train` on the file it wrote, starting from the chat's adapter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    fb = server.feedback
    before = {r["id"] for r in read_ratings(fb)}
    driver = _chromium()
    done = (By.CSS_SELECTOR, ".msg.assistant.done")
    try:
        wait = WebDriverWait(driver, 90)

        def status(text):
            wait.until(EC.text_to_be_present_in_element((By.ID, "status"), text))

        driver.get(server.base + "/")
        wait.until(lambda d: f"+ {server.run}" in d.find_element(By.ID, "info").text)
        # Count how many times the streaming bubble's text grows (streamed, not all at once).
        driver.execute_script(
            "window.__pieces = 0; new MutationObserver((ms) => { for (const m of ms)"
            " if (m.target.closest && m.target.closest('.msg.assistant.streaming')) window.__pieces++; })"
            ".observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"
        )
        driver.find_element(By.ID, "input").send_keys("What color is the sea?")
        driver.find_element(By.ID, "send").click()
        wait.until(
            lambda d: d.find_elements(*done) or "failed" in d.find_element(By.ID, "status").text
        )
        assert "failed" not in driver.find_element(By.ID, "status").text
        (reply,) = driver.find_elements(*done)
        text = reply.find_element(By.CLASS_NAME, "text").text
        assert text.strip()
        assert driver.execute_script("return window.__pieces") >= 2
        reply.find_element(By.CSS_SELECTOR, "button.up").click()
        status("saved: thumbs up")
        assert _active(reply, "up")
        driver.save_screenshot(str(tmp_path / "chat.png"))

        new = [r for r in read_ratings(fb) if r["id"] not in before]
        assert len(new) == 1
        up = new[0]
        assert up["label"] is True
        assert up["completion"] == [{"role": "assistant", "content": text}]
        assert up["prompt"] == [
            {"role": "system", "content": "Be polite."},
            {"role": "user", "content": "What color is the sea?"},
        ]
        assert up["meta"]["sampling"]["temp"] == 1.0
        assert up["meta"]["model"] == str(DEMO_MODEL) and up["meta"]["adapter"] == str(server.run)
        (ex,) = [e for e in load_examples(fb) if e.completion[0]["content"] == text]
        assert ex.label is True

        # Rated down instead: the thumbs-up is retracted, one live rating remains.
        reply.find_element(By.CSS_SELECTOR, "button.down").click()
        status("saved: thumbs down")
        assert _active(reply, "down") and not _active(reply, "up")
        live = [r for r in read_ratings(fb) if r["id"] not in before]
        assert [r["label"] for r in live] == [False] and live[0]["id"] != up["id"]
        assert {"retract": up["id"]}.items() <= json.loads(fb.read_text().splitlines()[-2]).items()
        down = live[0]

        # The ratings view lists it; undo retracts it (and training no longer sees it).
        item = wait.until(
            EC.presence_of_element_located(
                (By.CSS_SELECTOR, f'#ratings li[data-id="{down["id"]}"]')
            )
        )
        assert text in item.text
        item.find_element(By.CSS_SELECTOR, "button.undo").click()
        status("rating undone")
        assert down["id"] not in {r["id"] for r in read_ratings(fb)}
        assert driver.find_elements(By.CSS_SELECTOR, f'#ratings li[data-id="{down["id"]}"]') == []
        assert not _active(reply, "up") and not _active(reply, "down")
        assert json.loads(fb.read_text().splitlines()[-1])["retract"] == down["id"]

        # Regenerate replaces the latest reply (same prompt); it is the only one offering it.
        reply.find_element(By.CSS_SELECTOR, "button.regen").click()
        wait.until(lambda d: d.find_elements(*done) and (
            d.find_elements(*done)[0].get_attribute("data-reply-id") != up["meta"]["reply"]))  # fmt: skip
        (reply,) = driver.find_elements(*done)
        first_text = reply.find_element(By.CLASS_NAME, "text").text
        # History: the second turn's prompt carries the first exchange.
        driver.find_element(By.ID, "input").send_keys("What is the opposite of loud?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(*done)) == 2)
        assert reply.find_elements(By.CSS_SELECTOR, "button.regen") == []
        reply.find_element(By.CSS_SELECTOR, "button.up").click()
        status("saved: thumbs up")
        second = driver.find_elements(*done)[1]
        second_text = second.find_element(By.CLASS_NAME, "text").text
        second.find_element(By.CSS_SELECTOR, "button.down").click()
        status("saved: thumbs down")

        # Reload the tab: the conversation and each reply's rating state survive...
        driver.refresh()
        wait.until(lambda d: len(d.find_elements(*done)) == 2)
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .msg .text")]
        assert texts == [
            "What color is the sea?", first_text, "What is the opposite of loud?", second_text
        ]  # fmt: skip
        first, second = driver.find_elements(*done)
        assert _active(first, "up") and _active(second, "down")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ratings li")) == 2)
        # ...and rating still works: the server knows the replies, and flips the ratings.
        first.find_element(By.CSS_SELECTOR, "button.down").click()
        status("saved: thumbs down")
        second.find_element(By.CSS_SELECTOR, "button.up").click()
        status("saved: thumbs up")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ratings li")) == 2)
    finally:
        driver.quit()

    live = [r for r in read_ratings(fb) if r["id"] not in before]
    assert [(r["completion"][0]["content"], r["label"]) for r in live] == [
        (first_text, False), (second_text, True)
    ]  # fmt: skip
    assert live[1]["prompt"] == [
        {"role": "system", "content": "Be polite."},
        {"role": "user", "content": "What color is the sea?"},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "What is the opposite of loud?"},
    ]
    assert all(r["meta"]["adapter"] == str(server.run) for r in live)

    # The file trains as is: round 2 starts from the adapter the chat used (README step 4).
    out = tmp_path / "round2"
    run_cli(["data", "check", fb], tmp_path)
    p = run_cli(
        ["train", "--model", DEMO_MODEL, "--data", fb, "--init-adapter", server.run,
         "--adapter-path", out, "--iters", "2", "--batch-size", "2", "--no-ref-cache"],
        tmp_path,
    )  # fmt: skip
    assert (out / "adapters.safetensors").exists(), p.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2
