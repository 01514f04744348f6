"""Config values checked against their field types in one place (issue 24, YAML class): a
string for a boolean, a key given twice, a list where a mapping goes (and the reverse),
non-finite floats, from YAML, from flags and from the Python API. Each is one line naming
the file and line (or the flag) and the key, exit code 2, before anything is written."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

from mlx_kto.cli.app import cli, run
from mlx_kto.config import KTOConfig, load_yaml, make_config
from mlx_kto.config.types import kind
from mlx_kto.errors import UserError

import pytest

FIELDS = dataclasses.fields(KTOConfig)
BOOLS = [f.name for f in FIELDS if kind(f)[0] == "bool"]
FLOATS = [f.name for f in FIELDS if kind(f)[0] == "float"] + ["desirable_weight"]
INTS = [f.name for f in FIELDS if kind(f)[0] == "int"]
# (lr_schedule and report_to also take mlx-lm's mapping / TRL's list: their own cases below)
TEXTS = [
    f.name for f in FIELDS if kind(f)[0] == "str" and f.name not in ("lr_schedule", "report_to")
]


def cli_error(capsys, args):
    """Run `mlx-kto ARGS` as main() does; return (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(cli, args, prog_name="mlx-kto")
    return e.value.code, capsys.readouterr().err


def yaml_error(tmp_path, capsys, text):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    code, err = cli_error(capsys, ["train", "-c", str(cfg), "--adapter-path", str(out)])
    assert code == 2, err
    lines = [x for x in err.splitlines() if not x.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}:"), err
    assert "Traceback" not in err
    assert not out.exists()  # refused before anything was written
    return lines[0]


def test_the_field_kinds_cover_every_field():
    assert len(BOOLS) >= 8 and len(INTS) >= 20 and len(FLOATS) >= 12
    assert {"label_threshold", "collapse_threshold", "warmup_ratio"} <= set(FLOATS)
    assert all(kind(f)[0] in ("bool", "int", "float", "str", "list", "any") for f in FIELDS)


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("text", ["false", "no", "off", "true"])
def test_a_string_for_a_boolean_is_refused(tmp_path, capsys, name, text):
    line = yaml_error(tmp_path, capsys, f'{name}: "{text}"\n')
    assert f"run.yaml:1: '{name}': expected true or false, got the string '{text}'" in line


@pytest.mark.parametrize(
    "text, key",
    [
        ('use_dora: "false"\n', "use_dora"),  # mlx-lm: trained a DoRA adapter
        ('load_in_4bit: "no"\n', "load_in_4bit"),  # TRL: quantized the base to 4 bits
        ('load_in_8bit: "off"\n', "load_in_8bit"),
        ('bf16: "false"\n', "bf16"),
        ('gradient_checkpointing: "false"\n', "gradient_checkpointing"),
        ('disable_tqdm: "no"\n', "disable_tqdm"),
        ('mask_prompt: "false"\n', "mask_prompt"),
        ('push_to_hub: "false"\n', "push_to_hub"),
    ],
)
def test_a_string_for_another_tools_boolean_is_refused(tmp_path, capsys, text, key):
    line = yaml_error(tmp_path, capsys, text)
    assert f"run.yaml:1: '{key}'" in line and "expected true or false" in line


def test_yaml_booleans_are_fine(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("use_dora: false\nload_in_4bit: no\ngrad_checkpoint: off\ncompile: yes\n")
    cfg = make_config(p)
    assert cfg.fine_tune_type == "lora" and cfg.quantize is None
    assert cfg.grad_checkpoint is False and cfg.compile is True
    p.write_text("use_dora: true\nload_in_4bit: true\n")
    cfg = make_config(p)
    assert cfg.fine_tune_type == "dora" and cfg.quantize == 4


def test_numbers_written_as_strings_are_read(tmp_path):
    # PyYAML reads 5e-6 (no dot) as a string: TRL configs are full of them.
    p = tmp_path / "ok.yaml"
    p.write_text('learning_rate: 5e-6\niters: "100"\nbatch_size: 8.0\ndesirable_weight: Auto\n')
    values = load_yaml(p, log=lambda m: None)
    assert values == {
        "learning_rate": 5e-6,
        "iters": 100,
        "batch_size": 8,
        "desirable_weight": "auto",
    }


@pytest.mark.parametrize(
    "text, first, second, key",
    [
        ("beta: 0.1\niters: 3\nbeta: 0.5\n", 1, 3, "beta"),
        ("iters: 3\nlora_parameters:\n  rank: 4\n  rank: 8\n", 3, 4, "lora_parameters.rank"),
        ("batch_size: 4\nbatch_size: 4\n", 1, 2, "batch_size"),  # same value: still refused
    ],
)
def test_a_key_given_twice_names_both_lines(tmp_path, capsys, text, first, second, key):
    line = yaml_error(tmp_path, capsys, text)
    assert f"run.yaml:{second}: '{key}' is given twice (lines {first} and {second})" in line


@pytest.mark.parametrize(
    "text, expect",
    [
        ("optimizer_config: [adamw]\n", "'optimizer_config' must be a mapping"),
        ("optimizer_config: {adamw: [0.1]}\n", "'optimizer_config.adamw' must be a mapping"),
        ("optimizer_config: adamw\n", "'optimizer_config' must be a mapping"),
        (
            "lr_schedule: {name: cosine, arguments: {a: 1}}\n",
            "'lr_schedule.arguments' must be a list",
        ),
        (
            "lr_schedule: {name: cosine, warmup_init: [0]}\n",
            "'lr_schedule.warmup_init' must be a number",
        ),
        ("lr_schedule: [cosine]\n", "'lr_schedule': expected text, got a list"),
        ("lr_schedule: {name: [cosine]}\n", "lr_schedule.name"),
        ("lora_parameters: [rank, 4]\n", "'lora_parameters' must be a mapping"),
        (
            "lora_parameters: {rank: [4]}\n",
            "'lora_parameters' (lora_rank): expected a whole number, got a list",
        ),
        ("hf_dataset: [x]\n", "'hf_dataset' must be a mapping"),
        ("learning_rate: {a: 1}\n", "'learning_rate': expected a number, got a mapping"),
        ("iters: [1]\n", "'iters': expected a whole number, got a list"),
        ("lora_keys: {q_proj: 1}\n", "'lora_keys': expected a list of names, got a mapping"),
        ("lora_keys: [{q_proj: 1}]\n", "'lora_keys': expected a list of names, got a list"),
        ("model: [a, b]\n", "'model': expected text, got a list"),
        ("report_to: {wandb: 1}\n", "'report_to' must name loggers"),
        ("report_to: [1]\n", "'report_to' must list logger names"),
        ("max_steps: {a: 1}\n", "'max_steps' (iters): expected a whole number, got a mapping"),
        ("torch_dtype: [bf16]\n", "'torch_dtype' must name a dtype"),
        ("per_device_train_batch_size: eight\n", "'per_device_train_batch_size' (batch_size)"),
        ("batch_size:\n", "'batch_size': needs a value"),
        ("desirable_weight: [1]\n", "'desirable_weight': expected a number or 'auto'"),
    ],
)
def test_wrong_shapes_are_one_line(tmp_path, capsys, text, expect):
    line = yaml_error(tmp_path, capsys, text)
    assert "run.yaml:1: " in line and expect in line


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", '"nan"'])
def test_non_finite_floats_are_refused_from_yaml(tmp_path, capsys, name, value):
    line = yaml_error(tmp_path, capsys, f"{name}: {value}\n")
    assert f"'{name}': " in line and "is not a finite number" in line


@pytest.mark.parametrize("name", INTS)
def test_non_finite_and_fractional_ints_are_refused_from_yaml(tmp_path, capsys, name):
    assert "is not a finite number" in yaml_error(tmp_path, capsys, f"{name}: .inf\n")
    assert "expected a whole number, got 2.5" in yaml_error(tmp_path, capsys, f"{name}: 2.5\n")


@pytest.mark.parametrize("name", TEXTS)
def test_a_mapping_for_text_is_refused(tmp_path, capsys, name):
    line = yaml_error(tmp_path, capsys, f"{name}: {{a: 1}}\n")
    assert f"'{name}': expected text, got a mapping" in line


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--label-threshold", "nan"],
        ["train", "--beta", "inf"],
        ["train", "--learning-rate", "-inf"],
        ["train", "--collapse-threshold", "nan"],
        ["train", "--warmup-ratio", "nan"],
        ["train", "--desirable-weight", "nan"],
        ["data", "check", "feedback.jsonl", "--label-threshold", "nan"],
    ],
)
def test_non_finite_flags_are_refused(tmp_path, capsys, args):
    code, err = cli_error(
        capsys, args + (["--adapter-path", str(tmp_path / "o")] if args[0] == "train" else [])
    )
    flag = next(a for a in args if a.startswith("--"))
    assert code == 2 and err.startswith(f"error: {flag} (") and "not a finite number" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kw, expect",
    [
        ({"label_threshold": math.nan}, "--label-threshold (label_threshold): nan is not"),
        ({"beta": math.inf}, "--beta (beta): inf is not a finite number"),
        ({"collapse_threshold": math.nan}, "--collapse-threshold (collapse_threshold): nan"),
        ({"compile": "false"}, "--compile (compile): expected true or false"),
        ({"grad_checkpoint": 1}, "--grad-checkpoint (grad_checkpoint): expected true or false"),
        ({"iters": 2.5}, "--iters (iters): expected a whole number"),
        ({"lora_keys": {"q_proj": 1}}, "--lora-keys (lora_keys): expected a list of names"),
    ],
)
def test_the_python_api_checks_the_same_types(kw, expect):
    with pytest.raises(UserError, match="^" + expect.replace("(", r"\(").replace(")", r"\)")):
        make_config(None, **kw)
    with pytest.raises(UserError):
        KTOConfig(**kw).validate()


def test_a_bad_yaml_through_the_command_is_one_line():
    """The command a user runs, as a process: exit 2, one line, no traceback."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "run.yaml"
        p.write_text('model: some/model\nuse_dora: "false"\n')
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        res = subprocess.run(
            [sys.executable, "-m", "mlx_kto.cli", "train", "-c", str(p)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        f"error: {p}:2: 'use_dora': expected true or false, got the string 'false' "
        "(write true or false without quotes)"
    )
