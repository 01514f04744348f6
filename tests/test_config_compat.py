"""mlx-lm and TRL config names, 'did you mean', YAML-relative paths, PEFT short LoRA keys."""

import json
from pathlib import Path

from mlx_kto.config.core import load_yaml, make_config
from mlx_kto.errors import UserError

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def write_yaml(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def load(tmp_path, text):
    notes = []
    return load_yaml(write_yaml(tmp_path, text), log=notes.append), notes


def test_mlx_lm_names_map_to_our_fields(tmp_path):
    values, notes = load(
        tmp_path,
        "max_seq_length: 256\nval_batches: 5\nsave_every: 40\niters: 7\n"
        "lora_parameters: {rank: 4, scale: 10.0, dropout: 0.05, keys: [self_attn.q_proj]}\n"
        "lr_schedule: {name: cosine_decay, warmup: 3, arguments: [1.0e-4, 100, 0.0]}\n"
        "fine_tune_type: lora\ntrain: true\ntest: false\noptimizer: adamw\n",
    )
    assert values["max_length"] == 256 and values["eval_batches"] == 5
    assert values["steps_per_save"] == 40 and values["iters"] == 7
    assert (values["lora_rank"], values["lora_scale"], values["lora_dropout"]) == (4, 10.0, 0.05)
    assert values["lora_keys"] == ["self_attn.q_proj"]
    assert values["lr_schedule"] == "cosine" and values["warmup_steps"] == 3
    text = "\n".join(notes)
    assert "names mapped: max_seq_length -> max_length, val_batches -> eval_batches" in text
    assert "lora_parameters" in text
    cfg = make_config(tmp_path / "run.yaml")
    assert cfg.scale == 10.0


def test_trl_names_map_to_our_fields(tmp_path):
    values, notes = load(
        tmp_path,
        "per_device_train_batch_size: 6\ngradient_accumulation_steps: 3\nnum_train_epochs: 2.0\n"
        "max_steps: -1\nlr_scheduler_type: constant_with_warmup\nwarmup_ratio: 0.2\n"
        "save_steps: 11\nsave_total_limit: null\nlogging_steps: 2\neval_steps: 9\n"
        "report_to: [tensorboard]\noutput_dir: out\nbf16: true\ngradient_checkpointing: true\n"
        "beta: 0.3\nmax_prompt_length: 50\nlora_r: 16\nper_device_eval_batch_size: 8\n",
    )
    assert values["batch_size"] == 6 and values["grad_accumulation_steps"] == 3
    assert values["epochs"] == 2 and "iters" not in values
    assert values["lr_schedule"] == "constant" and values["warmup_ratio"] == 0.2
    assert values["steps_per_save"] == 11 and values["keep_checkpoints"] == 0
    assert values["steps_per_report"] == 2 and values["steps_per_eval"] == 9
    assert values["report_to"] == "tensorboard" and values["dtype"] == "bfloat16"
    assert values["grad_checkpoint"] is True and values["lora_rank"] == 16
    assert values["adapter_path"] == str(tmp_path / "out")  # relative to the YAML
    assert any("per_device_eval_batch_size" in n and "ignored" in n for n in notes)
    assert any("per_device_train_batch_size -> batch_size" in n for n in notes)


def test_trl_warmup_steps_zero_leaves_the_ratio(tmp_path):
    values, notes = load(tmp_path, "warmup_steps: 0\nwarmup_ratio: 0.25\n")
    assert "warmup_steps" not in values and values["warmup_ratio"] == 0.25
    values, _ = load(tmp_path, "warmup_steps: 5\nwarmup_ratio: 0.25\n")
    assert values["warmup_steps"] == 5  # > 0 wins, as in TRL


@pytest.mark.parametrize(
    "text, expect",
    [
        ("resume_adapter_file: a/b.safetensors\n", "init_adapter"),
        ("max_completion_length: 128\n", "max_length"),
        ("test: true\n", "mlx-kto eval --split test"),
        ("num_train_epochs: 2.5\n", "iters"),
        ("lr_scheduler_type: polynomial\n", "cosine, linear"),
        ("eval_strategy: epoch\n", "steps_per_eval"),
        ("optim: sgd\n", "AdamW"),
        ("fine_tune_type: full\n", "lora or dora"),
        ("report_to: all\n", "name the loggers"),
        ("lora_parameters: {rank: 4, scael: 2.0}\n", "did you mean 'scale'"),
        ("learning_rat: 1.0e-4\n", "did you mean 'learning_rate'"),
        ("per_device_train_batchsize: 4\n", "did you mean 'per_device_train_batch_size'"),
        ("batch_size: 4\nper_device_train_batch_size: 8\n", "both set batch_size"),
        ("report_to: wandbb\n", "did you mean 'wandb'"),
    ],
)
def test_refused_by_name_with_the_field_to_use(tmp_path, text, expect):
    p = write_yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        make_config(p)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_paths_resolve_relative_to_the_yaml(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "feedback.jsonl").write_text("{}\n")
    p = write_yaml(
        sub, "data: feedback.jsonl\nmodel: mlx-community/Some-Model-4bit\nadapter_path: ../out\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    values = load_yaml(p, log=lambda m: None)
    assert values["data"] == str(sub / "feedback.jsonl")
    assert values["model"] == "mlx-community/Some-Model-4bit"  # a hub id is left alone
    assert values["adapter_path"] == str(tmp_path / "out")


def test_example_yamls_name_their_mappings(capsys):
    for name in ("mlx_lm_lora.yaml", "trl_kto.yaml"):
        cfg = make_config(EXAMPLES / name)
        assert Path(cfg.model).is_dir() and Path(cfg.data).is_dir()
        err = capsys.readouterr().err
        assert "note:" in err
    cfg = make_config(EXAMPLES / "trl_kto.yaml")
    assert (cfg.batch_size, cfg.grad_accumulation_steps, cfg.iters) == (4, 2, 60)
    assert cfg.lora_keys == ["q_proj", "v_proj", "down_proj"]


def _toy_data(path, n=16):
    rows = []
    for i in range(n):
        good = i % 2 == 0
        rows.append(
            {
                "prompt": f"Tell me about the sky {i}.",
                "completion": " Sure, I would be happy to help." if good else " Go away.",
                "label": good,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["mlx_lm_lora.yaml", "trl_kto.yaml"])
def test_example_yaml_trains_from_the_cli(name, tiny_llama, tmp_path):
    from mlx_kto.cli.app import cli

    data = _toy_data(tmp_path / "fb.jsonl")
    out = tmp_path / "run"
    args = ["train", "-c", str(EXAMPLES / name), "--model", str(tiny_llama), "--data", str(data)]
    args += ["--adapter-path", str(out), "--iters", "2", "--quiet", "--no-compile"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "note:" in res.output
    saved = json.loads((out / "adapter_config.json").read_text())
    keys = saved["lora_parameters"]["keys"]
    assert keys == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]  # expanded
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_short_lora_keys_expand_and_unknown_ones_suggest(tiny_llama):
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.model.load import apply_lora, load_base, lora_modules

    cfg = KTOConfig(model=str(tiny_llama), lora_keys=["q_proj", "mlp.up_proj"]).validate()
    model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)
    assert cfg.lora_keys == ["self_attn.q_proj", "mlp.up_proj"]
    assert len(lora_modules(model)) == 2 * len(model.layers)
    cfg = KTOConfig(model=str(tiny_llama), lora_keys=["qproj"]).validate()
    model, _, _, _ = load_base(cfg)
    with pytest.raises(UserError, match="did you mean 'q_proj'"):
        apply_lora(model, cfg)
