"""A script written for TRL's KTOTrainer runs with only its import line changed (issue 23
item 9): TRL's constructor names, TRL's KTOConfig names, save_model, trainer.args / .model."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mlx_kto import KTOConfig, KTOTrainer
from mlx_kto.config.peft import lora_fields
from mlx_kto.config.trl_names import MAPPED, READS, REFUSED
from mlx_kto.errors import UserError

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD = [" Sure, I would be happy to help you.", " Of course! Here is what you need to know."]
BAD = [" Go away, I do not care.", " No. Figure it out yourself."]


def rows(n=16):
    return [
        {
            "prompt": f"Tell me about the sky {i}.",
            "completion": (GOOD if i % 2 == 0 else BAD)[i % 4 // 2],
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


# The body of a TRL 1.16 KTO script; only the import line differs from TRL's.
SCRIPT = """
import json, sys
from datasets import Dataset
from transformers import AutoTokenizer
{extra_imports}
from mlx_kto import KTOConfig, KTOTrainer  # was: from trl import KTOConfig, KTOTrainer

MODEL, OUT = sys.argv[1], sys.argv[2]
train_dataset = Dataset.from_list(json.loads(sys.argv[3]))
tokenizer = AutoTokenizer.from_pretrained(MODEL)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
{model_line}
training_args = KTOConfig(
    output_dir=OUT,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_steps=3,
    learning_rate=5e-6,
    lr_scheduler_type="linear",
    warmup_ratio=0.1,
    logging_steps=1,
    save_steps=100,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    loss_type="kto",
    max_length=64,
    report_to="none",
    seed=42,
    bf16=False,
    gradient_checkpointing=False,
    disable_dropout=True,
)
trainer = KTOTrainer(
    model=model,
    args=training_args,
    train_dataset=train_dataset,
    processing_class=tokenizer,
    peft_config={peft_config},
)
trainer.train()
trainer.save_model()
trainer.save_model(training_args.output_dir + "-copy")
print("RESULT", json.dumps({{"output_dir": trainer.args.output_dir,
    "max_steps": trainer.args.max_steps, "model": type(trainer.model).__module__}}))
"""


def run_script(tmp_path, tiny_llama, model_line, peft_config, extra_imports=""):
    script = tmp_path / "kto_trl.py"
    script.write_text(
        SCRIPT.format(model_line=model_line, peft_config=peft_config, extra_imports=extra_imports)
    )
    out = tmp_path / "kto-out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(script), str(tiny_llama), str(out), json.dumps(rows())],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return out, json.loads(line[len("RESULT ") :]), res.stdout + res.stderr


def check_adapter(out: Path, rank: int, scale: float, keys: list[str]):
    """What the script must leave: an mlx-lm adapter of the asked shape, 3 finite steps."""
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["lora_parameters"]["rank"] == rank
    assert conf["lora_parameters"]["scale"] == pytest.approx(scale)
    assert conf["lora_parameters"]["keys"] == keys
    assert conf["kto"]["beta"] == 0.1 and conf["kto"]["max_length"] == 64
    weights = mx.load(str(out / "adapters.safetensors"))
    assert sorted({k.split(".")[-2] for k in weights}) == sorted(k.split(".")[-1] for k in keys)
    for name, w in weights.items():
        assert np.isfinite(np.array(w)).all(), name
        if name.endswith("lora_a"):
            assert w.shape[-1] == rank
    moved = [float(mx.abs(w).max()) for k, w in weights.items() if k.endswith("lora_b")]
    assert max(moved) > 0  # B starts at zero: an update was applied
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    copy = mx.load(str(out.parent / (out.name + "-copy") / "adapters.safetensors"))
    assert copy.keys() == weights.keys()
    for k in weights:
        np.testing.assert_array_equal(np.array(copy[k]), np.array(weights[k]))


@pytest.mark.slow
def test_trl_script_with_a_model_path_and_a_peft_dict(tmp_path, tiny_llama):
    """torch-free: the model as its folder, PEFT settings as a dict."""
    out, result, err = run_script(
        tmp_path, tiny_llama, "model = MODEL",
        '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}',
    )  # fmt: skip
    check_adapter(out, 4, 2.0, ["self_attn.q_proj", "self_attn.v_proj"])
    assert result == {"output_dir": str(out), "max_steps": 3, "model": result["model"]}
    assert result["model"].startswith("mlx_lm.models")
    assert "names mapped: output_dir -> adapter_path" in err


@pytest.mark.slow
@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("peft")),
    reason="needs torch and peft (installed by .ci/interop.sh)",
)
def test_trl_script_with_a_transformers_model_and_a_lora_config(tmp_path, tiny_llama):
    """The TRL script as written: AutoModelForCausalLM + peft.LoraConfig."""
    out, result, err = run_script(
        tmp_path, tiny_llama, "model = AutoModelForCausalLM.from_pretrained(MODEL)",
        'LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], '
        'task_type="CAUSAL_LM")',
        extra_imports="from peft import LoraConfig\nfrom transformers import AutoModelForCausalLM",
    )  # fmt: skip
    check_adapter(out, 4, 4.0, ["self_attn.q_proj", "self_attn.v_proj"])
    assert "mlx-kto trains an MLX copy loaded from" in err
    assert "lora_dropout 0.05 not applied" in err  # TRL's disable_dropout zeroes it too
    saved = json.loads((out / "kto_config.json").read_text())
    assert saved["lora_dropout"] == 0.0


def test_a_model_path_is_loaded_and_save_model_writes_the_adapter(tmp_path, tiny_llama):
    args = KTOConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
        learning_rate=1e-3, max_length=64, report_to="none", logging_steps=1,
    )  # fmt: skip
    trainer = KTOTrainer(
        model=str(tiny_llama), args=args, train_dataset=rows(), log=lambda *_: None,
        peft_config={"r": 2, "lora_alpha": 4, "target_modules": "all-linear"},
    )  # fmt: skip
    assert trainer.args.output_dir == str(tmp_path / "run") and trainer.args.max_steps == 2
    assert trainer.args.lora_rank == 2 and trainer.args.lora_keys is None
    assert Path(trainer.model_path) == Path(tiny_llama)  # the reference cache is on
    assert trainer.processing_class is trainer.tokenizer is not None
    with pytest.raises(UserError, match="call train"):
        trainer.save_model()
    trainer.train()
    assert trainer.save_model() == Path(tmp_path / "run")
    other = trainer.save_model(tmp_path / "elsewhere")
    a = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    b = mx.load(str(other / "adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # 2 layers x 7 linear x (A, B)
    assert json.loads((other / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 2
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        trainer.save_model(tmp_path / "a-file")


def test_trl_config_names_map_and_read_back():
    c = KTOConfig(
        "out", per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=100,
        num_train_epochs=2, learning_rate=5e-6, lr_scheduler_type="constant_with_warmup",
        warmup_ratio=0.05, logging_steps=5, save_steps=50, eval_steps=25, save_total_limit=3,
        gradient_checkpointing=True, disable_tqdm=True, seed=7, max_length=256,
        max_prompt_length=128, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5,
        loss_type="apo_zero_unpaired", report_to=["tensorboard"], bf16=True,
        per_device_eval_batch_size=16, dataloader_num_workers=4, use_cpu=True,
    ).validate()  # fmt: skip
    ours = dict(
        adapter_path="out", batch_size=8, grad_accumulation_steps=2, iters=100, epochs=2,
        learning_rate=5e-6, lr_schedule="constant", warmup_ratio=0.05, steps_per_report=5,
        steps_per_save=50, steps_per_eval=25, keep_checkpoints=3, grad_checkpoint=True,
        quiet=True, seed=7, max_length=256, max_prompt_length=128, beta=0.2,
        desirable_weight=1.5, undesirable_weight=0.5, loss_type="apo_zero_unpaired",
        report_to="tensorboard", dtype="bfloat16",
    )  # fmt: skip
    assert {k: getattr(c, k) for k in ours} == ours
    for trl, field in READS.items():  # TRL's names read back as our fields
        assert getattr(c, trl) == getattr(c, field), trl
    assert KTOConfig().max_steps == -1 and KTOConfig(max_steps=-1).iters is None
    c.output_dir = "elsewhere"  # a TRL-style write lands on the field
    assert c.adapter_path == "elsewhere" and "output_dir" not in vars(c)
    c.max_steps = -1
    assert c.iters is None


@pytest.mark.parametrize(
    "kw, expect",
    [
        ({"max_completion_length": 64}, "'max_completion_length' is not supported: use max_length"),
        ({"train_sampling_strategy": "sequential"}, "TRL's sequential order is not offered"),
        ({"disable_dropout": False}, "lora_dropout"),
        ({"sync_ref_model": True}, "the reference is the frozen base"),
        ({"lr_scheduler_kwargs": {"num_cycles": 2}}, "'lr_scheduler_kwargs' is not supported"),
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha"),
        ({"adam_beta2": 0.99}, "beta2 is fixed at 0.999"),
        ({"optim": "sgd"}, "the optimizer is AdamW"),
        ({"use_peft": False}, "full fine-tuning is not offered"),
        ({"push_to_hub": True}, "upload the adapter folder yourself"),
        ({"num_train_epochs": 1.5}, "whole number of epochs"),
        ({"lr_scheduler_type": "polynomial"}, "lr_schedule is one of cosine, linear, constant"),
        ({"per_device_train_batchsize": 4}, "did you mean 'per_device_train_batch_size'"),
        ({"batch_size": 4, "per_device_train_batch_size": 8}, "both set batch_size"),
        ({"bf16": "false"}, "'bf16': expected true or false"),
    ],
)
def test_trl_config_names_without_an_equivalent_are_refused_by_name(kw, expect):
    with pytest.raises(UserError, match="^KTOConfig: ") as e:
        KTOConfig(**kw)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_the_trl_name_tables_do_not_overlap_our_fields():
    from mlx_kto.config.fields import field_names

    ours = set(field_names())
    assert not ours & set(MAPPED) and not ours & set(REFUSED) and not ours & set(READS)
    assert set(READS.values()) <= ours


def test_peft_lora_config_translation():
    fields, notes = lora_fields(
        {"r": 16, "lora_alpha": 32, "target_modules": {"v_proj", "q_proj"}, "use_dora": True}
    )
    assert fields == {
        "lora_rank": 16, "lora_alpha": 32.0, "lora_keys": ["q_proj", "v_proj"],
        "lora_scale": None, "fine_tune_type": "dora",
    }  # fmt: skip
    fields, _ = lora_fields({"r": 16, "lora_alpha": 32, "use_rslora": True})
    assert fields["lora_scale"] == pytest.approx(32 / 4) and fields["lora_keys"] == [
        "q_proj",
        "v_proj",
    ]  # PEFT's default targets for Llama-style models
    assert any("PEFT's default" in n for n in lora_fields({})[1])


@pytest.mark.skipif(not importlib.util.find_spec("peft"), reason="needs peft")
def test_peft_lora_config_object_translation():
    from peft import LoraConfig

    fields, notes = lora_fields(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"])
    )
    assert (fields["lora_rank"], fields["lora_alpha"], fields["lora_keys"]) == (4, 8.0, ["q_proj"])
    assert any("lora_dropout 0.1 not applied" in n for n in notes)
    with pytest.raises(UserError, match="bias='all' is not supported"):
        lora_fields(LoraConfig(bias="all"))
    with pytest.raises(UserError, match="modules_to_save"):
        lora_fields(LoraConfig(modules_to_save=["lm_head"]))
    with pytest.raises(UserError, match="init_lora_weights='pissa'"):
        lora_fields(LoraConfig(init_lora_weights="pissa"))


@pytest.mark.parametrize(
    "peft, expect",
    [
        ({"r": 4, "bias": "all"}, "bias='all' is not supported"),
        ({"layers_to_transform": [0]}, "last num_layers blocks"),
        ({"target_modules": ".*proj"}, "a regular expression is not matched here"),
        ({"rank": 4}, "unknown LoRA setting 'rank'"),
        ({"r": 0}, "r must be a positive number"),
        ({"task_type": "SEQ_CLS"}, "only CAUSAL_LM"),
        ({"peft_type": "IA3"}, "a IA3 config"),
        (["r", 4], "expected a peft LoraConfig or a dict"),
    ],
)
def test_peft_settings_the_adapter_cannot_be_are_refused(peft, expect):
    with pytest.raises(UserError, match="^peft_config: ") as e:
        lora_fields(peft)
    assert expect in str(e.value)


def test_trainer_refusals_are_one_line(tokenizer, tiny_llama):
    from mlx_kto import Callback

    from mlx_lm import load

    model, tok = load(str(tiny_llama))
    base = dict(train_dataset=rows(4), args={"iters": 1}, log=lambda *_: None)
    with pytest.raises(UserError, match="^ref_model: mlx-kto's reference is the base"):
        KTOTrainer(model, tok, ref_model=model, **base)
    with pytest.raises(UserError, match="^ref_model: "):  # TRL's order: (model, ref_model, ...)
        KTOTrainer(model, model, processing_class=tok, **base)
    with pytest.raises(UserError, match="^args: pass it by name"):
        KTOTrainer(model, None, KTOConfig(), processing_class=tok)
    with pytest.raises(UserError, match="^data_collator: "):
        KTOTrainer(model, tok, data_collator=object(), **base)
    with pytest.raises(UserError, match="^compute_metrics: "):
        KTOTrainer(model, tok, compute_metrics=lambda p: {}, **base)
    with pytest.raises(UserError, match="^optimizers: "):
        KTOTrainer(model, tok, optimizers=(object(), None), **base)
    with pytest.raises(UserError, match="^quantization_config: the model is loaded already"):
        KTOTrainer(model, tok, quantization_config={"load_in_4bit": True}, **base)
    with pytest.raises(UserError, match="^processing_class: give the tokenizer once"):
        KTOTrainer(model, tok, processing_class=object(), **base)

    class TrainerCallback:  # what a transformers callback looks like from here
        pass

    with pytest.raises(UserError, match=r"^callbacks\[1\]: TrainerCallback \(a transformers"):
        KTOTrainer(model, tok, callbacks=[Callback(), TrainerCallback()], **base)
    with pytest.raises(UserError, match="^eval_dataset: a dict of datasets"):
        KTOTrainer(model, tok, eval_dataset={"a": type("D", (), {"to_list": list})()}, **base)
    with pytest.raises(UserError, match="^model: expected an MLX model"):
        KTOTrainer(42, tok, **base)
    with pytest.raises(UserError, match="^model: give a model"):
        KTOTrainer(None, tok, **base)
    # TRL's signature with the trainer's own loader: no tokenizer needed.
    t = KTOTrainer(model=str(tiny_llama), ref_model=None, **base)
    assert t.tokenizer is not None and t.ref_model is None
