"""A GGUF file's header without its vocabulary: scalar metadata and tensor infos, with the
tensor data memory-mapped (no copy). gguf-py's GGUFReader also turns every vocabulary
string (~50k for SmolLM2) into a numpy view, 4-15 s per load on a 2-core machine; the
vocabulary is only needed by the tokenizer, which transformers reads (once, cached).
Format: magic "GGUF", version, n_tensors, n_kv; KVs (key, type, value); tensor infos
(name, n_dims, ne[], type, offset); data aligned to general.alignment (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.errors import UserError

import numpy as np

# Version of our GGUF -> mlx-lm mapping: part of the reference fingerprint and tokenizer cache key.
MAPPING_VERSION = "mlx_kto.gguf/1"


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # ggml ne: [cols, rows]
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # [rows, cols] for F32/F16, else raw bytes [rows, row bytes]


@dataclass
class _Header:
    fields: dict  # scalar and string KVs (arrays are skipped: the tokenizer reads those)
    tensors: list[_Tensor]


# GGUF value type -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


def read_header(path: Path) -> _Header:
    """The GGUF header (scalar KVs, tensor infos) and memory-mapped tensor data."""
    try:
        import gguf
    except ImportError:
        raise UserError(
            "GGUF models need the gguf package: pip install 'mlx-kto[convert]'"
        ) from None
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        mv = memoryview(buf)
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", mv, 0)
        if magic != 0x46554747 or version < 2:
            raise ValueError("no GGUF v2/v3 magic")
        pos = 24

        def read(fmt):
            nonlocal pos
            v = struct.unpack_from("<" + fmt, mv, pos)[0]
            pos += struct.calcsize("<" + fmt)
            return v

        def string():
            nonlocal pos
            n = read("Q")
            pos += n
            return bytes(mv[pos - n : pos]).decode("utf-8", errors="replace")

        def value(typ, keep=True):
            nonlocal pos
            if typ in _SCALARS:
                return read(_SCALARS[typ])
            if typ == 8:
                return string()
            if typ == 9:
                sub, n = read("I"), read("Q")
                if sub in _SCALARS:  # fixed size: skip in one step
                    pos += n * struct.calcsize("<" + _SCALARS[sub])
                else:
                    for _ in range(n):
                        value(sub, keep=False)
                return None
            raise ValueError(f"unknown GGUF value type {typ}")

        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(read("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            ne = tuple(read("Q") for _ in range(read("I")))
            infos.append((name, ne, gguf.GGMLQuantizationType(read("I")), read("Q")))
        align = int(fields.get("general.alignment") or 32)
        start = (pos + align - 1) // align * align
        tensors = []
        for name, ne, typ, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[typ]
            rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
            row_bytes = ne[0] // block * size
            raw = buf[start + offset : start + offset + rows * row_bytes]
            if typ.name in ("F32", "F16"):
                data = raw.view(np.float32 if typ.name == "F32" else np.float16)
                data = data.reshape(tuple(reversed(ne)))
            else:
                data = raw.reshape(rows, row_bytes)
            tensors.append(_Tensor(name, ne, typ, data))
    except Exception as e:  # truncated / not GGUF: one line naming the file
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    return _Header(fields, tensors)


def meta(reader: _Header, key: str, default=None):
    v = reader.fields.get(key)
    return default if v is None else v
