"""The whole loop: a scripted terminal chat (a real pty) rates three replies and quits;
`mlx-kto train` trains on that file; chat continues with the new adapter; a second
round trains from the first round's adapter, which is then the frozen reference."""

import json
import os
import sys
from pathlib import Path

from mlx_kto.collect.chat import run_terminal_chat
from mlx_kto.collect.session import ChatSession, Sampling, default_model, load_chat_model
from mlx_kto.config.core import make_config
from mlx_kto.data.rows import load_examples
from mlx_kto.train.run import train

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = r"\[q\] quit > "


def train_cfg(data, out, **kw):
    base = dict(
        model=default_model(),
        data=str(data),
        adapter_path=str(out),
        iters=3,
        batch_size=2,
        learning_rate=1e-2,
        warmup_steps=0,
        lora_rank=4,
        num_layers=2,
        steps_per_eval=0,
        steps_per_save=0,
        no_ref_cache=True,
        quiet=True,
    )
    return make_config(None, **{**base, **kw})


def test_chat_rate_train_chat_again_second_round(tmp_path):
    pexpect = pytest.importorskip(
        "pexpect", reason="pexpect not installed (pip install -e .[test])"
    )
    fb = tmp_path / "feedback.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_kto.cli", "chat", "--feedback", str(fb), "--seed", "0", "--max-tokens", "24"],
        env=env,
        encoding="utf-8",
        timeout=180,
        cwd=str(tmp_path),
    )
    try:
        child.expect("you> ")
        child.sendline("What color is the sea?")
        child.expect(KEYS)
        child.send("u")  # one key, no Enter
        child.expect("saved: thumbs up")
        child.expect(KEYS)
        child.send("\r")  # go on
        child.expect("you> ")
        child.sendline("What is the opposite of loud?")
        child.expect(KEYS)
        child.send("d")
        child.expect("saved: thumbs down")
        child.expect(KEYS)
        child.send("r")  # regenerate: a new reply to the same prompt
        child.expect("assistant> ")
        child.expect(KEYS)
        child.send("u")
        child.expect("saved: thumbs up")
        child.expect(KEYS)
        child.send("q")
        child.expect(r"bye: 3 rating\(s\) saved")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before

    rows = [json.loads(line) for line in fb.read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False, True]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What color is the sea?"}]
    # The second question's prompt carries the first exchange (the reply kept on "go on").
    assert [m["role"] for m in rows[1]["prompt"]] == ["user", "assistant", "user"]
    assert rows[1]["prompt"][1]["content"] == rows[0]["completion"][0]["content"]
    assert rows[2]["prompt"] == rows[1]["prompt"]  # regenerated: same prompt, new reply
    assert rows[0]["meta"]["sampling"] == {"temp": 0.7, "top_p": 1.0, "max_tokens": 24, "seed": 0}
    assert rows[0]["meta"]["adapter"] is None and rows[0]["meta"]["time"]
    assert len(load_examples(fb)) == 3

    # Round 1: train on exactly that file.
    run1 = tmp_path / "run1"
    res1 = train(train_cfg(fb, run1), log=lambda *_: None)
    assert res1.steps == 3 and (run1 / "adapters.safetensors").exists()

    # Chat with the new adapter (scripted, in-process) and rate one more reply.
    model, tok = load_chat_model(default_model(), str(run1))
    from mlx.utils import tree_flatten

    lora_b = [v for k, v in tree_flatten(model.parameters()) if k.endswith("lora_b")]
    assert lora_b and max(float(abs(v).max()) for v in lora_b) > 0  # run1's weights are in
    session = ChatSession(
        model, tok, model_name=default_model(), adapter_path=str(run1), feedback=fb,
        sampling=Sampling(temp=1.0, max_tokens=16, seed=1),
    )  # fmt: skip
    lines, keys = iter(["Can you help me with my cooking?"]), iter(["d", "q"])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert (
        run_terminal_chat(
            session, echo=lambda *a, **k: None, read_line=read_line, read_key=lambda: next(keys)
        )
        == 1
    )
    last = json.loads(fb.read_text().splitlines()[-1])
    assert last["meta"]["adapter"] == str(run1) and last["label"] is False

    # Round 2 starts from run1: at step 1 the policy equals the frozen reference (run1),
    # so every implied reward is 0 although run1 is far from the base model.
    run2 = tmp_path / "run2"
    logs = []
    res2 = train(train_cfg(fb, run2, init_adapter=str(run1), iters=2), log=logs.append)
    assert res2.steps == 2
    assert any("it is also the (frozen) reference" in m for m in logs)
    first = json.loads((run2 / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    # ...whereas scored against the base model, run1's rewards on the same rows are not 0.
    from mlx_kto.judge.evaluate import evaluate_adapter

    ev = evaluate_adapter(train_cfg(fb, tmp_path / "ev"), str(run1), "train")
    assert abs(ev["rewards/chosen"]) > 1e-3
