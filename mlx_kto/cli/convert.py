"""`mlx-kto convert ...`: thin click wrappers over the converter functions."""

from __future__ import annotations

from mlx_kto.cli.options import HELP
from mlx_kto.export.fuse import DTYPES as FUSE_DTYPES
from mlx_kto.export.fuse import fuse
from mlx_kto.export.gguf_base import gguf_to_mlx
from mlx_kto.export.gguf_lora import OUTTYPES, to_gguf
from mlx_kto.export.hf import DTYPES as HF_DTYPES
from mlx_kto.export.hf import Q_BITS, Q_GROUP_SIZES, hf_to_mlx
from mlx_kto.export.ollama import store_base, to_ollama
from mlx_kto.export.peft import from_peft, to_peft

import click

_overwrite = click.option(
    "--overwrite", is_flag=True, help="Write into an existing (non-empty) output."
)


@click.group("convert", context_settings=HELP)
def convert():
    """Convert models and adapters: Hugging Face, PEFT, llama.cpp GGUF, Ollama, fused checkpoints."""


@convert.command("hf-to-mlx")
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights (affine).")
@click.option(
    "--q-bits", type=click.Choice([str(b) for b in Q_BITS]), default="4", show_default=True,
    help="Bits per weight when quantizing.",
)  # fmt: skip
@click.option(
    "--q-group-size", type=click.Choice([str(g) for g in Q_GROUP_SIZES]), default="64",
    show_default=True, help="Quantization group size.",
)  # fmt: skip
@click.option(
    "--dtype", type=click.Choice(HF_DTYPES), default=None,
    help="Cast float weights (default: the checkpoint's torch_dtype).",
)  # fmt: skip
def hf_to_mlx_cmd(model, out, quantize, q_bits, q_group_size, dtype):
    """Hugging Face checkpoint MODEL (folder or hub id) to an MLX folder OUT."""
    path = hf_to_mlx(model, out, quantize, int(q_bits), int(q_group_size), dtype)
    click.echo(f"wrote {path}")


@convert.command("gguf-to-mlx")
@click.argument("gguf_file", metavar="FILE", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "-q", "--quantize", "q_bits", type=click.Choice(["4", "8"]), default=None,
    help="Re-quantize the layers that had to be dequantized (K-quants, F16, ...) to MLX bits.",
)  # fmt: skip
@click.option(
    "--q-group-size", type=click.Choice([str(g) for g in Q_GROUP_SIZES]), default="64",
    show_default=True, help="Group size for --quantize.",
)  # fmt: skip
@click.option(
    "--dtype", type=click.Choice(HF_DTYPES), default=None,
    help="Dtype of dequantized tensors [default: float16].",
)  # fmt: skip
@_overwrite
def gguf_to_mlx_cmd(gguf_file, out, q_bits, q_group_size, dtype, overwrite):
    """llama.cpp GGUF model FILE to an mlx-lm folder OUT (Q4_0/Q4_1/Q8_0 stay quantized)."""
    path = gguf_to_mlx(
        gguf_file, out, int(q_bits) if q_bits else None, int(q_group_size), dtype,
        overwrite=overwrite, log=lambda m: click.echo(m, err=True),
    )  # fmt: skip
    click.echo(f"wrote {path}")


@convert.command("to-peft")
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--base", default=None,
    help="Hugging Face base model (id or folder) for base_model_name_or_path "
    "[default: the adapter's 'model'].",
)  # fmt: skip
@_overwrite
def to_peft_cmd(adapter, out, base, overwrite):
    """mlx-lm ADAPTER folder to a PEFT LoRA folder OUT."""
    click.echo(f"wrote {to_peft(adapter, out, base=base, overwrite=overwrite)}")


@convert.command("from-peft")
@click.argument("peft_dir", metavar="PEFT", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--base", default=None,
    help="Base model (id or folder) [default: base_model_name_or_path, if local].",
)  # fmt: skip
@_overwrite
def from_peft_cmd(peft_dir, out, base, overwrite):
    """PEFT LoRA folder (safetensors) to an mlx-lm adapter folder OUT."""
    click.echo(f"wrote {from_peft(peft_dir, out, base=base, overwrite=overwrite)}")


@convert.command("to-gguf")
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--base", required=True,
    help="The base .gguf file (or ollama:NAME[:TAG]), or the Hugging Face model (folder or "
    "cached id) it was made from.",
)  # fmt: skip
@click.option(
    "--outtype", type=click.Choice(OUTTYPES), default="f32", show_default=True,
    help="Type of the LoRA tensors (q8_0 keeps F16 for rows not a multiple of 32).",
)  # fmt: skip
@_overwrite
def to_gguf_cmd(adapter, out, base, outtype, overwrite):
    """mlx-lm ADAPTER to a llama.cpp LoRA GGUF file OUT (use with --lora)."""
    with store_base(base) as base_file:  # ollama:NAME / lmstudio:...: its GGUF file
        path = to_gguf(adapter, out, base=base_file, outtype=outtype, overwrite=overwrite)
    click.echo(f"wrote {path}")


@convert.command("to-ollama")
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--base", default=None,
    help="The GGUF the adapter was trained on: ollama:NAME[:TAG] or FILE.gguf "
    "[default: the run's 'model'].",
)  # fmt: skip
@click.option(
    "--outtype", type=click.Choice(OUTTYPES), default="f32", show_default=True,
    help="Type of the LoRA tensors.",
)  # fmt: skip
@_overwrite
def to_ollama_cmd(run, out, base, outtype, overwrite):
    """Adapter RUN to an Ollama model folder OUT: adapter.gguf + Modelfile (FROM the base,
    ADAPTER ./adapter.gguf); prints the `ollama create` line to run."""
    res = to_ollama(run, out, base=base, outtype=outtype, overwrite=overwrite)
    click.echo(f"wrote {res.adapter} and {res.modelfile} (FROM {res.base_from})")
    click.echo("make it an Ollama model with:")
    click.echo(f"  {res.create_command()}")


@convert.command("fuse")
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--base", default=None, help="Base model [default: the adapter's 'model'].")
@click.option("--dequantize", is_flag=True, help="Required for a quantized base: write floats.")
@click.option(
    "--dtype", type=click.Choice(list(FUSE_DTYPES)), default=None,
    help="Output dtype [default: the base's float dtype].",
)  # fmt: skip
@click.option("--gguf", "gguf_path", type=click.Path(), default=None,
              help="Also write a GGUF of the fused model (needs --llama-cpp-dir).")  # fmt: skip
@click.option("--llama-cpp-dir", type=click.Path(), default=None,
              help="A llama.cpp checkout; its convert_hf_to_gguf.py makes the GGUF.")  # fmt: skip
@click.option("--gguf-outtype", default="f16", show_default=True,
              help="--outtype passed to convert_hf_to_gguf.py.")  # fmt: skip
@_overwrite
def fuse_cmd(
    adapter, out, base, dequantize, dtype, gguf_path, llama_cpp_dir, gguf_outtype, overwrite
):
    """Fuse ADAPTER into its base; write a Hugging Face checkpoint OUT."""
    path = fuse(
        adapter, out, base=base, dequantize=dequantize, dtype=dtype, gguf=gguf_path,
        llama_cpp_dir=llama_cpp_dir, gguf_outtype=gguf_outtype, overwrite=overwrite,
    )  # fmt: skip
    click.echo(f"wrote {path}" + (f" and {gguf_path}" if gguf_path else ""))
