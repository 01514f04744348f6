"""A GGUF file's header: scalar metadata, small arrays and tensor infos, with the tensor data
memory-mapped (no copy). gguf-py's GGUFReader also turns every vocabulary string (~50k for
SmolLM2, 262k for Gemma 3) into a numpy view, 4-15 s per load on a 2-core machine; here the
vocabulary arrays are skipped unless asked for by key (`arrays`: the tokenizer's).
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
MAPPING_VERSION = "mlx_kto.gguf/2"
SMALL_ARRAY = 1024  # numeric arrays up to this long are kept (e.g. a per-layer pattern)


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # ggml ne: [cols, rows]
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # [rows, cols] for F32/F16, else raw bytes [rows, row bytes]


@dataclass
class _Header:
    fields: dict  # scalar, string and small numeric-array KVs, plus the arrays asked for
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


_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}  # fmt: skip


def read_header(path: Path, arrays: frozenset[str] = frozenset()) -> _Header:
    """The GGUF header (scalar KVs, small numeric arrays, tensor infos) and memory-mapped
    tensor data; the arrays named in `arrays` (e.g. tokenizer.ggml.tokens) as Python lists."""
    try:
        import gguf
    except ImportError:
        raise UserError(
            "GGUF models need the gguf package: pip install gguf (a dependency of mlx-kto)"
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

        def skip_string():
            nonlocal pos
            pos += 8 + struct.unpack_from("<Q", mv, pos)[0]

        def value(typ, keep):
            nonlocal pos
            if typ in _SCALARS:
                return read(_SCALARS[typ])
            if typ == 8:
                return string()
            if typ == 9:
                sub, n = read("I"), read("Q")
                if sub in _SCALARS:  # fixed size: one numpy view, or one skip
                    size = n * struct.calcsize("<" + _SCALARS[sub])
                    out = None
                    if keep or n <= SMALL_ARRAY:
                        out = np.frombuffer(mv[pos : pos + size], dtype=_NUMPY[sub]).tolist()
                    pos += size
                    return out
                if sub == 8 and keep:
                    return [string() for _ in range(n)]
                for _ in range(n):
                    skip_string() if sub == 8 else value(sub, keep=False)
                return None
            raise ValueError(f"unknown GGUF value type {typ}")

        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(read("I"), keep=key in arrays)
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
