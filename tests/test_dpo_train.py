"""DPO / IPO through the trainer: paired batches, gradients, accumulation, metrics, errors."""

import json
import random
import shutil

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.errors import UserError
from mlx_kto.train.run import train

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

GOOD = [" Sure, I would be happy to help you.", " Of course! Here is what you need to know."]
BAD = [" Go away, I do not care.", " No. Figure it out yourself."]
TOPICS = ["sky", "sea", "cat", "hat", "story", "poem", "answer", "homework", "grass", "light"]
DPO_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def write_pairs(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            topic = " ".join(rng.sample(TOPICS, 2))
            row = {
                "prompt": f"Tell me about the {topic}.",
                "chosen": rng.choice(GOOD),
                "rejected": rng.choice(BAD),
            }
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    write_pairs(d / "train.jsonl", 24, seed=0)
    write_pairs(d / "valid.jsonl", 8, seed=1)
    return d


def cfg_for(model, data, out, **kw):
    base = dict(
        model=str(model), data=str(data), adapter_path=str(out), loss_type="dpo",
        batch_size=2, iters=12, learning_rate=2e-3, lora_rank=4, lora_alpha=8.0,
        steps_per_eval=0, steps_per_save=0, max_length=64, quiet=True, seed=0, warmup_steps=2,
    )  # fmt: skip
    base.update(kw)
    return make_config(None, **base)


def test_a_dpo_step_raises_the_margin_of_its_pairs(tiny_llama, tmp_path):
    """One step at a small learning rate on one batch of 4 pairs, evaluated on those pairs.
    Before it the policy is the reference (margins 0, loss log 2); the step follows the
    gradient of -log sigmoid(beta * margin), so to first order it raises the mean margin and
    lowers the loss of the pairs it saw: true on every machine (no trajectory; at lr 1e-4
    the change is ~1e-2, float noise ~1e-6)."""
    d = tmp_path / "pairs"
    d.mkdir()
    write_pairs(d / "train.jsonl", 4, seed=0)
    shutil.copy(d / "train.jsonl", d / "valid.jsonl")
    cfg = cfg_for(
        tiny_llama, d, tmp_path / "run", iters=1, batch_size=4, learning_rate=1e-4,
        warmup_steps=0, lr_schedule="constant",
    )  # fmt: skip
    res = train(cfg, log=lambda *_: None)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert len(lines) == 1
    for k in DPO_KEYS:
        assert k in lines[-1] and k in res.eval_metrics
    assert "kl" not in lines[-1]  # no KL sequences for a paired loss
    assert {"logits/chosen", "logits/rejected", "entropy"} <= lines[-1].keys()  # last step
    assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert lines[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    ev = res.eval_metrics  # after the step, on the same pairs
    assert ev["rewards/margins"] > 1e-4, ev
    assert ev["loss"] < np.log(2) - 1e-4, ev


def test_ipo_trains(tiny_llama, pair_dir, tmp_path):
    res = train(
        cfg_for(tiny_llama, pair_dir, tmp_path, loss_type="ipo", iters=3), log=lambda *_: None
    )
    assert res.steps == 3 and np.isfinite(res.final_metrics["loss"])


def test_step_gradient_equals_autograd_of_dpo_loss(lora_model, tokenizer):
    from mlx_kto.data.batches import make_batch
    from mlx_kto.data.pairs import find_pairs, pair_batch_order
    from mlx_kto.data.rows import parse_row
    from mlx_kto.data.tokenize import tokenize_examples
    from mlx_kto.model.logprobs import sequence_logps
    from mlx_kto.train.loop import make_step_fns
    from mlx_kto.train.loss import dpo_loss

    import mlx.optimizers as optim

    model, _ = lora_model
    examples = []
    for i in range(3):
        row = {"prompt": f"Q{i} about the sky?", "chosen": GOOD[i % 2], "rejected": BAD[i % 2]}
        examples += parse_row(row, f"mem:{i + 1}")[0]
    rows, _ = tokenize_examples(examples, tokenizer, 64, None)
    pairs, _ = find_pairs(rows)
    (idx,) = pair_batch_order(rows, pairs, 3, 0, 0, shuffle=False)
    batch = make_batch(rows, idx, 16, 0, False)
    assert batch.kl_tokens is None and batch.labels.tolist() == [True] * 3 + [False] * 3
    ref = mx.array([-30.0, -25.0, -28.0, -31.0, -27.0, -26.0])
    for compile_ in (False, True):
        cfg = KTOConfig(model="x", loss_type="dpo", beta=0.3, compile=compile_, max_grad_norm=0)
        fns = make_step_fns(model, optim.AdamW(1e-3), cfg, 1.0)
        loss, metrics, grad, _ = fns.grad_step(batch, ref, None, mx.array(1.0), None, False)

        def direct(model):
            pol = sequence_logps(model, batch.tokens, batch.mask)
            return dpo_loss(pol[:3], pol[3:], ref[:3], ref[3:], beta=0.3)[0]

        want_loss, want = nn.value_and_grad(model, direct)(model)
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
        got, want = dict(tree_flatten(grad)), dict(tree_flatten(want))
        assert got.keys() == want.keys() and len(got) > 0
        for k in got:
            np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=2e-3, atol=1e-6)
        assert metrics["count/chosen"].item() == 3


def test_micro_batches_and_accumulation_give_the_same_step(tiny_llama, pair_dir, tmp_path):
    adapters = []
    for i, (bs, acc) in enumerate([(4, 1), (2, 2), (1, 4)]):
        out = tmp_path / f"r{i}"
        cfg = cfg_for(
            tiny_llama, pair_dir / "train.jsonl", out, iters=1, batch_size=bs,
            grad_accumulation_steps=acc, warmup_steps=0, lr_schedule="constant", compile=False,
        )  # fmt: skip
        res = train(cfg, log=lambda *_: None)
        adapters.append((mx.load(str(out / "adapters.safetensors")), res.final_metrics))
    (a0, m0), rest = adapters[0], adapters[1:]
    for a, m in rest:
        assert m["loss"] == pytest.approx(m0["loss"], rel=1e-4)
        # Before the first update the rewards are 0 up to float noise between batch shapes
        # (BLAS blocking), so accuracy (a strict > on ties) is noise; the margins are not.
        assert m["rewards/margins"] == pytest.approx(m0["rewards/margins"], abs=1e-4)
        for k in a0:
            np.testing.assert_allclose(np.array(a[k]), np.array(a0[k]), rtol=1e-3, atol=1e-5)


def test_unpaired_data_is_refused_by_name(tiny_llama, tmp_path):
    bad = tmp_path / "fb.jsonl"
    bad.write_text(
        '{"prompt": "a", "completion": " yes", "label": true}\n'
        '{"prompt": "b", "completion": " no", "label": false}\n'
    )
    with pytest.raises(UserError, match=r"fb.jsonl:1: loss_type dpo/ipo needs paired rows"):
        train(cfg_for(tiny_llama, bad, tmp_path / "out"), log=lambda *_: None)


def test_eval_command_scores_a_dpo_adapter(tiny_llama, pair_dir, tmp_path):
    from mlx_kto.cli.app import cli

    from click.testing import CliRunner

    res = train(cfg_for(tiny_llama, pair_dir, tmp_path, iters=6), log=lambda *_: None)
    args = ["eval", "--model", str(tiny_llama), "--adapter-path", str(res.adapter_path)]
    out = CliRunner().invoke(cli, [*args, "--data", str(pair_dir), "--max-length", "64"])
    assert out.exit_code == 0, out.output
    scores = json.loads(out.output[out.output.index("{") :])
    assert scores["pairs"] == 8 and scores["rows"] == 16
    assert scores["rewards/margins"] == pytest.approx(res.eval_metrics["rewards/margins"], rel=1e-4)


def test_cli_dpo_on_unpaired_file_is_one_line(tiny_llama, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "fb.jsonl"
    bad.write_text('{"prompt": "a", "completion": " yes", "label": true}\n' * 2)
    args = ["train", "--model", str(tiny_llama), "--data", str(bad), "--loss-type", "dpo"]
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *args, "--adapter-path", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "fb.jsonl:1" in err[0] and "paired" in err[0], p.stderr
    assert "Traceback" not in p.stderr


def test_dpo_resume_continues_exactly(tiny_llama, pair_dir, tmp_path):
    """A DPO run resumed from its step-4 checkpoint (mid-epoch: 24 pairs, 2 per step) ends
    with the straight run's adapter: the saved position is one of pair batches."""
    from mlx_kto.train.checkpoint import list_checkpoints

    kw = dict(iters=8, steps_per_save=4, compile=False)
    straight = train(cfg_for(tiny_llama, pair_dir, tmp_path / "a", **kw), log=lambda *_: None)
    first = list_checkpoints(tmp_path / "a")[0]
    assert first.name == "step_0000004"
    resumed = train(
        cfg_for(tiny_llama, pair_dir, tmp_path / "c", resume=str(first), **kw),
        log=lambda *_: None,
    )
    a = mx.load(str(straight.adapter_path / "adapters.safetensors"))
    c = mx.load(str(resumed.adapter_path / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(c[k]), atol=1e-5, rtol=1e-4)


def test_split_pairs_keeps_each_micro_batch_chosen_then_rejected():
    from mlx_kto.train.dpo import split_pairs

    # a global batch of 5 pairs (c_i = i, r_i = 10 + i) over 2 ranks, micro-batches of 2 pairs
    shards = split_pairs([0, 1, 2, 3, 4, 10, 11, 12, 13, 14], world=2, micro=2)
    assert shards == [[[0, 1, 10, 11], [2, 12]], [[3, 4, 13, 14]]]


def _cli_error(args: list[str]) -> str:
    """`mlx-kto ARGS` as a user runs it: exit 2 and exactly one `error:` line, returned."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    return err[0]


def test_cli_dpo_refuses_pairs_that_teach_nothing_or_mix_prompts(tiny_llama, tmp_path):
    """Silently wrong before: chosen == rejected in every pair trained nothing and exited 0;
    per-message labels paired replies to different prompts (both rated in one chat)."""
    same = tmp_path / "same.jsonl"
    same.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}?", "chosen": GOOD[i % 2], "rejected": GOOD[i % 2]}) + "\n"
            for i in range(6)
        )
    )
    chat = tmp_path / "chat.jsonl"
    msgs = [
        {"role": "user", "content": "Tell me about the sky."},
        {"role": "assistant", "content": "Sure, it is blue.", "label": True},
        {"role": "user", "content": "And the sea?"},
        {"role": "assistant", "content": "Go away.", "label": False},
    ]
    chat.write_text(json.dumps({"messages": msgs}) + "\n")
    base = ["train", "--model", str(tiny_llama), "--loss-type", "dpo", "--max-length", "64"]
    err = _cli_error([*base, "--data", str(same), "--adapter-path", str(tmp_path / "a")])
    assert "chosen equals rejected" in err and "same.jsonl:1" in err
    assert not (tmp_path / "a" / "adapters.safetensors").exists()
    err = _cli_error([*base, "--data", str(chat), "--adapter-path", str(tmp_path / "b")])
    assert "chat.jsonl:1: loss_type dpo/ipo needs paired rows" in err


def test_some_identical_pairs_are_named_in_a_warning(tokenizer):
    from mlx_kto.data.rows import parse_row
    from mlx_kto.data.tokenize import tokenize_examples
    from mlx_kto.train.dpo import check_pairs

    examples = []
    for i, rejected in enumerate([BAD[0], GOOD[1], BAD[1]]):
        row = {"prompt": f"Q{i}?", "chosen": GOOD[i % 2], "rejected": rejected}
        examples += parse_row(row, f"mem:{i + 1}")[0]
    rows, _ = tokenize_examples(examples, tokenizer, 64, None)
    logs = []
    assert len(check_pairs(rows, "train", "dpo", logs.append)) == 3
    assert logs == ["warning: train: 1 of 3 pairs have chosen equal to rejected (first: mem:2); "
                    "they teach nothing"]  # fmt: skip
