#!/usr/bin/env bash
# llama.cpp's own HF -> GGUF converter, for tests/test_convert_llamacpp_hf.py: the copy
# vendored in the llama-cpp-python sdist (convert_hf_to_gguf.py, conversion/, gguf-py/),
# in its own venv with the transformers 4.x its requirements pin (ours is 5.x).
# Cached in $MLX_KTO_TEST_CACHE/llamacpp_convert (default ~/.cache/mlx_kto_test):
#   src/     the converter files          venv/   its Python
# Idempotent: the marker file is written last, so a second run only checks it and an
# interrupted one starts over. Exits non-zero if something
# could not be fetched or installed; the test then skips and says why.
set -uo pipefail
LLAMA_CPP_PYTHON_VERSION=0.3.36
# The pinned torch (requirements-convert_hf_to_gguf.txt) comes from PyTorch's own index,
# which is not reachable here; any CPU torch runs the converter, so take this one.
TORCH_VERSION=2.13.0
ROOT="${MLX_KTO_TEST_CACHE:-$HOME/.cache/mlx_kto_test}/llamacpp_convert"
MARK="$ROOT/ready-$LLAMA_CPP_PYTHON_VERSION"
[ -f "$MARK" ] && [ -x "$ROOT/venv/bin/python" ] && { echo "llamacpp-convert: cached in $ROOT"; exit 0; }

PY=${PYTHON:-python3}
set -e
rm -rf "$ROOT" && mkdir -p "$ROOT/dl"
echo "llamacpp-convert: fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$ROOT/dl" \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
sdist=$(ls "$ROOT/dl"/llama_cpp_python-*.tar.gz)
top="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
tar xzf "$sdist" -C "$ROOT" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" \
  "$top/requirements"
mv "$ROOT/$top" "$ROOT/src" && rm -rf "$ROOT/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"

echo "llamacpp-convert: creating its venv (transformers as its requirements pin)"
"$PY" -m venv "$ROOT/venv"
VPY="$ROOT/venv/bin/python"
# The requirements minus torch (above) and the PyTorch index line.
reqs="$ROOT/reqs.txt"
cat "$ROOT/src/requirements/requirements-convert_legacy_llama.txt" \
  | grep -v -E '^\s*(-|#|$)' >"$reqs"
grep -q '^transformers==4\.' "$reqs" || { echo "llamacpp-convert: no transformers 4.x pin found"; exit 1; }
"$VPY" -m pip install -q "torch==$TORCH_VERSION" -r "$reqs" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import torch, transformers, sentencepiece, numpy; print('llamacpp-convert: transformers', transformers.__version__)"
rm -rf "$ROOT/dl"
touch "$MARK"
echo "llamacpp-convert: ready in $ROOT"
