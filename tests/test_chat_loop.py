"""The whole loop as the README runs it, every step a command: `mlx-kto chat` in a real
pty rates three replies; `mlx-kto train` trains on that file; `mlx-kto chat
--adapter-path round1` rates more; `mlx-kto train --init-adapter round1` trains round
2, whose frozen reference is then round 1's adapter."""

import json

from mlx_kto.data.rows import load_examples

import pytest
from chat_procs import DEMO_MODEL, cli_env, mlx_kto, run_cli

KEYS = r"\[q\] quit > "
TRAIN = ["--model", DEMO_MODEL, "--batch-size", "2", "--learning-rate", "1e-2",
         "--warmup-steps", "0", "--lora-rank", "4", "--num-layers", "2", "--no-ref-cache"]  # fmt: skip


def chat(pexpect, tmp_path, args):
    cmd = mlx_kto() + ["chat"] + [str(a) for a in args]
    return pexpect.spawn(
        cmd[0], cmd[1:], env=cli_env(), encoding="utf-8", timeout=180, cwd=str(tmp_path)
    )


@pytest.mark.slow  # two chats and two trainings as commands: ~15 s
def test_chat_rate_train_chat_again_second_round(tmp_path):
    pexpect = pytest.importorskip(
        "pexpect", reason="pexpect not installed (pip install -e .[test])"
    )
    fb = tmp_path / "feedback.jsonl"
    child = chat(pexpect, tmp_path, ["--feedback", fb, "--seed", "0", "--max-tokens", "24"])
    try:
        child.expect("you> ")
        child.sendline("What color is the sea?")
        child.expect(KEYS)
        child.send("u")  # one key, no Enter; the rating is the decision
        child.expect("saved: thumbs up")
        child.expect("you> ")
        child.sendline("What is the opposite of loud?")
        child.expect(KEYS)
        child.send("r")  # regenerate: a new reply to the same prompt
        child.expect("assistant> ")
        child.expect(KEYS)
        child.send("d")
        child.expect("saved: thumbs down")
        child.expect("you> ")
        child.sendline("Thanks!")
        child.expect(KEYS)
        child.send("u")
        child.expect("saved: thumbs up")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(r"bye: 3 rating\(s\) saved")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before

    rows = [json.loads(line) for line in fb.read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False, True]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What color is the sea?"}]
    # The second question's prompt carries the first exchange (a rated reply is kept).
    assert [m["role"] for m in rows[1]["prompt"]] == ["user", "assistant", "user"]
    assert rows[1]["prompt"][1]["content"] == rows[0]["completion"][0]["content"]
    assert rows[2]["prompt"][-3:-1] == [*rows[1]["prompt"][-1:], *rows[1]["completion"]]
    assert rows[0]["meta"]["sampling"] == {"temp": 0.7, "top_p": 1.0, "max_tokens": 24, "seed": 0}
    assert rows[0]["meta"]["adapter"] is None and rows[0]["meta"]["time"]
    assert len(load_examples(fb)) == 3

    # Round 1: train on exactly that file.
    round1 = tmp_path / "round1"
    run_cli(["train", *TRAIN, "--data", fb, "--adapter-path", round1, "--iters", "3"], tmp_path)
    assert (round1 / "adapters.safetensors").exists()

    # Chat with the new adapter and rate one more reply (Ctrl-D at the prompt leaves).
    child = chat(pexpect, tmp_path, ["--adapter-path", round1, "--feedback", fb, "--temp", "1.0",
                                     "--max-tokens", "16", "--seed", "1"])  # fmt: skip
    try:
        child.expect("you> ")
        child.sendline("Can you help me with my cooking?")
        child.expect(KEYS)
        child.send("d")
        child.expect("saved: thumbs down")
        child.expect("you> ")
        child.sendeof()
        child.expect(r"bye: 1 rating\(s\) saved")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    last = json.loads(fb.read_text().splitlines()[-1])
    assert last["meta"]["adapter"] == str(round1) and last["label"] is False

    # Round 2 starts from round 1: at step 1 the policy equals the frozen reference
    # (round 1), so every implied reward is 0 although round 1 is far from the base.
    round2 = tmp_path / "round2"
    p = run_cli(["train", *TRAIN, "--data", fb, "--init-adapter", round1,
                 "--adapter-path", round2, "--iters", "2"], tmp_path)  # fmt: skip
    assert "it is also the (frozen) reference" in p.stdout + p.stderr
    first = json.loads((round2 / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    # ...whereas scored against the base model, round 1's rewards on the same rows are not 0.
    from mlx_kto.config.core import make_config
    from mlx_kto.judge.evaluate import evaluate_adapter

    cfg = make_config(None, model=str(DEMO_MODEL), data=str(fb), adapter_path=str(tmp_path / "ev"),
                      lora_rank=4, num_layers=2, no_ref_cache=True, quiet=True)  # fmt: skip
    ev = evaluate_adapter(cfg, str(round1), "train")
    assert abs(ev["rewards/chosen"]) > 1e-3
