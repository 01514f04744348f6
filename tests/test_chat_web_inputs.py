"""Bad input to `mlx-kto chat --web` (launched as a user launches it): every body, and a
malformed feedback file, gets a 4xx with a JSON error, never a 500; the body limit
stops reading at the limit."""

import http.client
import json
import random
import signal
import socket
import threading
import time

from mlx_kto.data.feedback import append_row, rating_row, read_ratings

import pytest
from chat_procs import WebChat

FIELDS = ["reply_id", "label", "rating_id", "messages", "role", "content", "id", "x"]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    work = tmp_path_factory.mktemp("web_inputs")
    chat = WebChat(["--feedback", work / "fb.jsonl", "--max-tokens", "4", "--seed", "0"], work)
    yield chat
    assert chat.stop() == 0, chat.stderr
    assert "Traceback" not in chat.stderr, chat.stderr


def post(port, path, raw: bytes, headers=None, method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {
        "Host": f"127.0.0.1:{port}",
        "Origin": f"http://127.0.0.1:{port}",
        "Content-Type": "application/json",
        **(headers or {}),
    }
    conn.request(method, path, body=raw, headers=h)
    r = conn.getresponse()
    status, body, kind = r.status, r.read(), r.getheader("content-type", "")
    conn.close()
    return status, body, kind


def assert_refused(status, body, kind, codes=range(400, 500)):
    assert status in codes, (status, body[:300])
    assert kind.startswith("application/json"), kind
    err = json.loads(body)["error"]
    assert isinstance(err, str) and err and "\n" not in err.strip() and "Traceback" not in err
    return err


def alive(port):
    status, body, _ = post(port, "/api/ratings", b"", method="GET")
    assert status == 200, body


@pytest.mark.parametrize(
    "path,body,word",
    [
        ("/api/rate", {"reply_id": ["a", "b"], "label": True}, "reply_id"),
        ("/api/rate", {"reply_id": {"id": "a"}, "label": True}, "reply_id"),
        ("/api/rate", {"reply_id": 7, "label": True}, "reply_id"),
        ("/api/rate", {"reply_id": "nope", "label": "yes"}, "label"),
        ("/api/rate", {"reply_id": "nope", "label": 1}, "label"),
        ("/api/rate", {"label": True}, "reply_id"),
        ("/api/undo", {"rating_id": ["x"]}, "rating_id"),
        ("/api/undo", {"rating_id": {"x": 1}}, "rating_id"),
        ("/api/undo", {"rating_id": True}, "rating_id"),
        ("/api/reply", {"messages": {"role": "user", "content": "hi"}}, "messages"),
        ("/api/reply", {"messages": [{"role": "user", "content": ["hi"]}]}, "content"),
        ("/api/reply", {"messages": [["user", "hi"]]}, "role"),
        ("/api/reply", {"messages": []}, "messages"),
        ("/api/reply", [1, 2], "object"),
        ("/api/rate", "reply", "object"),
        ("/api/undo", None, "object"),
    ],
)
def test_a_field_of_the_wrong_type_is_a_400_naming_it(web, path, body, word):
    err = assert_refused(*post(web.port, path, json.dumps(body).encode()), codes=(400,))
    assert word in err


@pytest.mark.parametrize(
    "raw,word",
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested"),  # 400 kB, under the 1 MB cap
        (b'{"reply_id": ' + b"[" * 100_000 + b"]" * 100_000 + b', "label": true}', "nested"),
        (b'{"rating_id": ' + b"1" * 5000 + b"}", "invalid JSON"),  # longer than int() takes
        (b'{"reply_id": "\xff\xfe", "label": true}', "UTF-8"),
        (b'{"reply_id": "a", "label": tru', "invalid JSON"),
        (b"", "invalid JSON"),
        (b'{"reply_id": NaN, "label": Infinity}', "reply_id"),
    ],
)
def test_malformed_bodies_are_a_400(web, raw, word):
    for path in ("/api/rate", "/api/undo", "/api/reply"):
        err = assert_refused(*post(web.port, path, raw), codes=(400,))
        assert word in err or path != "/api/rate", err
    alive(web.port)


def _random_json(rng: random.Random, depth=0):
    kinds = ["null", "bool", "int", "big", "float", "str", "list", "dict"]
    kind = rng.choice(kinds if depth < 4 else kinds[:6])
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        keys = rng.sample(FIELDS, rng.randint(0, 3))
        return {k: _random_json(rng, depth + 1) for k in keys}
    return {
        "null": None,
        "bool": rng.random() < 0.5,
        "int": rng.randint(-3, 3),
        "big": 10**30,
        "float": rng.choice([0.5, -1e308, 1e-300]),
        "str": rng.choice(["", "a", "user", "assistant", "\u0000", "é" * 50]),
    }[kind]


def test_no_body_is_a_500(web):
    """Random JSON bodies (mostly the right keys with values of any type) to every POST
    endpoint: each is refused with a JSON 4xx or served (a stream); the server lives."""
    rng = random.Random(0)
    served = 0
    for i in range(300):
        path = ("/api/rate", "/api/undo", "/api/reply")[i % 3]
        body = {k: _random_json(rng, 1) for k in rng.sample(FIELDS, rng.randint(0, 3))}
        if i % 7 == 0:
            body = _random_json(rng)
        status, raw, kind = post(web.port, path, json.dumps(body).encode())
        if status < 400:
            served += 1
            continue
        assert_refused(status, raw, kind)
    alive(web.port)
    assert served < 300


def test_unknown_paths_methods_and_content_types_are_json_4xx(web):
    assert_refused(*post(web.port, "/api/nope", b"{}"), codes=(404,))
    assert_refused(*post(web.port, "/api/rate", b"", method="GET"), codes=(405,))
    assert_refused(
        *post(web.port, "/api/rate", b"{}", {"Content-Type": "text/plain"}), codes=(415,)
    )
    assert_refused(*post(web.port, "/api/rate", b"{}", {"Origin": "http://evil.example"}), codes=(403,))  # fmt: skip


def _raw_request(port, headers: str):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        f"POST /api/rate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{headers}\r\n".encode()
    )
    return s


def _response(s) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "connection closed without a response"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        rest += s.recv(65536)
    return status, json.loads(rest[:length])


def test_a_large_content_length_is_refused_before_the_body_is_read(web):
    """50 MB announced, nothing sent: the 413 comes at once (the server does not wait
    for, or read, the body)."""
    s = _raw_request(web.port, f"Content-Length: {50 << 20}\r\n")
    try:
        start = time.monotonic()
        status, body = _response(s)
        assert status == 413 and "too large" in body["error"]
        assert time.monotonic() - start < 10
    finally:
        s.close()
    alive(web.port)


def test_a_chunked_body_is_read_only_up_to_the_limit(web):
    """No Content-Length: the server stops at 1 MB and answers 413 while the client is
    still sending (it would send 50 MB)."""
    s = _raw_request(web.port, "Transfer-Encoding: chunked\r\n")
    chunk = b"[" * 65536
    sent = 0
    status = None
    try:
        s.settimeout(0.5)
        while sent < 50 << 20:
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(chunk)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # the server answered before the body ended
            except (TimeoutError, BlockingIOError):
                continue
        s.settimeout(30)
        status, body = _response(s)
    finally:
        s.close()
    assert status == 413 and "too large" in body["error"]
    assert sent < 4 << 20  # it answered about 1 MB in, not after 50
    alive(web.port)


def test_a_malformed_feedback_file_is_a_409_naming_the_line(tmp_path):
    """A retraction naming a list id (or a rating whose id is a list) in the feedback
    file: the chat starts with a warning, lists and undo answer 409 with the line."""
    fb = tmp_path / "fb.jsonl"
    good = rating_row([{"role": "user", "content": "hi"}], "Hello.", True)
    append_row(fb, good)
    append_row(fb, {"retract": [good["id"]]})
    chat = WebChat(["--feedback", fb, "--max-tokens", "4"], tmp_path)
    try:
        assert "warning:" in chat.stderr and "fb.jsonl:2" in chat.stderr
        err = assert_refused(*post(chat.port, "/api/ratings", b"", method="GET"), codes=(409,))
        assert "fb.jsonl:2" in err and "'retract'" in err
        err = assert_refused(*post(chat.port, "/api/undo", json.dumps({"rating_id": good["id"]}).encode()), codes=(409,))  # fmt: skip
        assert "fb.jsonl:2" in err
        # A rating whose id is a list, next to a retraction: the same, naming its line.
        fb.write_text(
            json.dumps({**good, "id": ["x"]}) + "\n" + json.dumps({"retract": "y"}) + "\n"
        )
        err = assert_refused(*post(chat.port, "/api/ratings", b"", method="GET"), codes=(409,))
        assert "fb.jsonl:1" in err and "'id'" in err
    finally:
        assert chat.stop() == 0
    assert "Traceback" not in chat.stderr, chat.stderr


def test_ratings_view_shows_any_row_as_text(tmp_path):
    """Rows written by other tools (content parts, numeric time, odd labels) list fine."""
    fb = tmp_path / "fb.jsonl"
    rows = [
        {"prompt": "plain", "completion": "text", "label": True, "meta": {"time": 5}},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],
         "completion": [{"role": "assistant", "content": {"odd": 1}}], "label": "yes"},
    ]  # fmt: skip
    fb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = WebChat(["--feedback", fb, "--max-tokens", "4"], tmp_path)
    try:
        status, body, _ = post(chat.port, "/api/ratings", b"", method="GET")
        assert status == 200
        listed = json.loads(body)["ratings"]
        assert [(r["prompt"], r["completion"], r["label"], r["time"]) for r in listed] == [
            ("parts", '{"odd": 1}', None, None), ("plain", "text", True, None)
        ]  # fmt: skip
        assert all(r["undoable"] is False for r in listed)
    finally:
        assert chat.stop() == 0
    assert len(read_ratings(fb)) == 2


def _streaming_chat(tmp_path) -> tuple[WebChat, list[str], threading.Thread]:
    """A web chat with a long sampled reply in flight: its first 5 events read."""
    chat = WebChat(["--feedback", tmp_path / "fb.jsonl", "--temp", "10", "--max-tokens", "2000",
                    "--seed", "0"], tmp_path)  # fmt: skip
    events: list[str] = []
    started = threading.Event()

    def read_reply():
        conn = http.client.HTTPConnection("127.0.0.1", chat.port, timeout=60)
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}]})
        conn.request("POST", "/api/reply", body=body, headers={
            "Host": f"127.0.0.1:{chat.port}", "Origin": f"http://127.0.0.1:{chat.port}",
            "Content-Type": "application/json"})  # fmt: skip
        r = conn.getresponse()
        try:
            for line in r:
                if line.startswith(b"event: "):
                    events.append(line[7:].strip().decode())
                    if len(events) >= 5:
                        started.set()
        except OSError:  # the server went away mid-reply (a second Ctrl-C may force it)
            events.append("cut")
        started.set()
        conn.close()

    for _ in range(5):  # a sampled reply may end by itself within 5 tokens: ask again
        events.clear()
        started.clear()
        reader = threading.Thread(target=read_reply, daemon=True)
        reader.start()
        assert started.wait(60)
        if "done" not in events:
            return chat, events, reader  # still streaming
        reader.join(10)
    chat.stop()
    pytest.fail("every reply ended by itself within 5 tokens")


def test_ctrl_c_while_a_reply_streams_stops_the_server_at_once(tmp_path):
    """One Ctrl-C: the reply in flight ends at its next token (as a done event), the process
    exits 0 without a traceback, instead of streaming on to max_tokens first."""
    chat, events, reader = _streaming_chat(tmp_path)
    start = time.monotonic()
    chat.proc.send_signal(signal.SIGINT)
    assert chat.wait(30) == 0, chat.log
    assert time.monotonic() - start < 15
    reader.join(10)
    assert events[-1] == "done" and events.count("token") < 2000
    assert "Traceback" not in chat.stderr and "terminate" not in chat.stderr, chat.stderr
    assert "mlx-kto chat: stopped" in "".join(chat.out)


def test_ctrl_c_pressed_again_and_again_never_hangs(tmp_path):
    """Ctrl-C held down: signals land inside the handling of the one before (a stop flag
    that took a lock deadlocked the main thread there: the process hung, found by CI). The
    process ends within seconds, by a clean exit or by the signal, without a traceback."""
    chat, events, reader = _streaming_chat(tmp_path)
    start = time.monotonic()
    while chat.proc.poll() is None and time.monotonic() - start < 20:
        chat.proc.send_signal(signal.SIGINT)  # back to back: some land inside the handler
    rc = chat.wait(10)
    assert rc in (0, 130, -signal.SIGINT), chat.log
    assert time.monotonic() - start < 15, chat.log
    assert "Traceback" not in chat.stderr and "terminate" not in chat.stderr, chat.stderr
