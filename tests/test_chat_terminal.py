"""`mlx-kto chat --adapter-path RUN` in a real pty (pexpect), typed into key by key as a
person types: a rating closes the reply's menu, so the next message arrives whole
(letters at the message prompt are always message text); /undo re-rates; Ctrl-C
while a reply streams stops that reply and offers its keys."""

import json
import re
import time

from mlx_kto.data.feedback import read_ratings

import pytest
from assets_smollm2 import smollm2_gguf  # noqa: F401, F811  (fixture)
from chat_procs import cli_env, demo_adapter, mlx_kto, run_cli

pexpect = pytest.importorskip("pexpect", reason="pexpect not installed (pip install -e .[test])")

MENU = r"\[q\] quit > "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return demo_adapter(tmp_path_factory)


def spawn(args, cwd):
    cmd = mlx_kto() + ["chat"] + [str(a) for a in args]
    child = pexpect.spawn(
        cmd[0], cmd[1:], env=cli_env(), encoding="utf-8", timeout=120, cwd=str(cwd)
    )
    child.expect("you> ")
    return child


def type_keys(child, text, delay=0.03):
    """Key by key, a fast typist's pace (no waiting for the program in between)."""
    for ch in text:
        child.send(ch)
        time.sleep(delay)


def finish(child):
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.before


def lines(fb):
    return [json.loads(line) for line in fb.read_text().splitlines()]


@pytest.mark.slow  # a pty chat typed key by key: ~10 s
def test_typing_the_next_message_right_after_a_rating(run, tmp_path):
    """The issue's sequence: `u` then `do you like dogs?` at once used to flip the
    rating to thumbs down (the `d`), lose the `o` and send `you like dogs?`; messages
    starting with q or r quit or regenerated."""
    fb = tmp_path / "ratings.jsonl"
    child = spawn(["--adapter-path", run, "--feedback", fb, "--seed", "0", "--max-tokens", "16"], tmp_path)  # fmt: skip
    try:
        type_keys(child, "What color is the sea?\r")
        child.expect(MENU)
        type_keys(child, "udo you like dogs?\r")  # rate, then straight on to the next message
        child.expect("saved: thumbs up")
        child.expect(MENU)  # the reply to "do you like dogs?"
        type_keys(child, "dquick question: why?\r")  # a message starting with q: not quit
        child.expect("saved: thumbs down")
        child.expect(MENU)
        type_keys(child, "\rrepeat that please\r")  # go on unrated; a message starting with r
        child.expect(MENU)
        type_keys(child, "r")  # now a key: regenerate
        child.expect("assistant> ")
        child.expect(MENU)
        type_keys(child, "u")
        child.expect("saved: thumbs up")
        type_keys(child, "/undo\r")  # re-rating goes through /undo
        child.expect("undone: thumbs up")
        child.expect("leave it unrated > ")
        type_keys(child, "d")
        child.expect("saved: thumbs down")
        child.expect("you> ")
        type_keys(child, "/quit\r")
        child.expect(r"bye: 3 rating\(s\) saved")
        finish(child)
    finally:
        child.close(force=True)

    rows = lines(fb)
    kinds = ["retract" if "retract" in r else r["label"] for r in rows]
    assert kinds == [True, False, True, "retract", False]
    sea, dogs, regen, retraction, regen_down = rows
    assert retraction["retract"] == regen["id"]  # only /undo wrote a retraction
    assert sea["prompt"] == [{"role": "user", "content": "What color is the sea?"}]
    users = [m["content"] for m in regen_down["prompt"] if m["role"] == "user"]
    assert users == [
        "What color is the sea?", "do you like dogs?", "quick question: why?", "repeat that please"
    ]  # fmt: skip
    assert dogs["prompt"][-1] == {"role": "user", "content": "do you like dogs?"}
    assert regen_down["prompt"] == regen["prompt"]
    assert regen_down["completion"] == regen["completion"]
    assert all(r["meta"]["adapter"] == str(run) for r in (sea, dogs, regen_down))
    live = read_ratings(fb)
    assert [(r["id"], r["label"]) for r in live] == [
        (sea["id"], True), (dogs["id"], False), (regen_down["id"], False)
    ]  # fmt: skip
    check = run_cli(["data", "check", fb], tmp_path)
    assert "3" in check.stdout + check.stderr


def test_ctrl_c_while_streaming_stops_the_reply_and_offers_the_keys(run, tmp_path):
    """A long reply (high temperature, many tokens) is stopped by Ctrl-C: the part shown
    can be rated, the chat goes on; Ctrl-C at the message prompt then leaves."""
    fb = tmp_path / "ratings.jsonl"
    args = ["--adapter-path", run, "--feedback", fb, "--temp", "10", "--max-tokens", "2000"]
    child = spawn(args + ["--seed", "0"], tmp_path)
    try:
        type_keys(child, "Tell me a long story.\r")
        for _ in range(5):  # a sampled reply may end by itself first: then regenerate
            child.expect("assistant> ")
            child.expect(r"\S{3}")  # the reply is streaming
            shown = child.before + child.after
            child.sendintr()
            if child.expect([r" \[stopped\]\r\n", MENU]) == 0:
                break
            child.send("r")
        else:
            pytest.fail("no reply was still streaming when Ctrl-C came")
        shown = shown + child.before
        child.expect(MENU)
        child.send("d")
        child.expect("saved: thumbs down")
        child.expect("you> ")  # the chat goes on
        type_keys(child, "And then?\r")
        child.expect("assistant> ")
        child.expect(r"\S{3}")
        child.sendintr()
        child.expect(MENU)
        child.send("\r")
        child.expect("you> ")
        child.sendintr()  # at the message prompt: leave, as before
        child.expect(r"bye: 1 rating\(s\) saved")
        finish(child)
    finally:
        child.close(force=True)

    (row,) = lines(fb)
    text = row["completion"][0]["content"]
    assert row["label"] is False and text
    assert len(text) < 2000 * 2  # stopped well before max-tokens
    visible = re.compile(r"[\s\x00-\x1f\x7f]")  # the pty rewrites line ends
    assert visible.sub("", text) == visible.sub("", shown)  # what was rated is what streamed


def test_ctrl_c_while_the_model_loads_exits_cleanly(tmp_path, smollm2_gguf):  # noqa: F811
    """Ctrl-C during the load (a real model takes seconds): one line, exit 130, and no
    abort from MLX's teardown under the still-loading thread."""
    cmd = mlx_kto() + ["chat", "--model", str(smollm2_gguf), "--feedback", str(tmp_path / "f.jsonl")]  # fmt: skip
    child = pexpect.spawn(cmd[0], cmd[1:], env=cli_env(), encoding="utf-8", timeout=120, cwd=str(tmp_path))  # fmt: skip
    try:
        child.expect("tensors")  # the GGUF is being read: the MLX thread is at work
        child.sendintr()
        i = child.expect(["interrupted while loading the model", "you> "])
        if i == 1:
            pytest.skip("the model finished loading before Ctrl-C arrived")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130, (child.exitstatus, child.signalstatus, child.before)
    assert "terminate called" not in child.before and "Traceback" not in child.before


def test_an_adapter_of_another_base_is_one_line_naming_its_base(run, tiny_llama, tmp_path):
    """`chat --model OTHER --adapter-path RUN`: one line saying which base RUN was
    trained on (mlx-lm's error lists every tensor), exit 2, and no abort at exit."""
    p = run_cli(["chat", "--model", tiny_llama, "--adapter-path", run], tmp_path, ok=False)
    assert p.returncode == 2, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert "does not fit" in line and "trained on" in line and "demo/assets/model" in line
    assert "Traceback" not in p.stderr and "terminate" not in p.stderr
