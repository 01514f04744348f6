#!/usr/bin/env bash
# Install the real consumers the converter interop tests run against:
#   torch (CPU) + peft  -> tests/test_convert_interop_peft.py
#   llama-cpp-python    -> tests/test_convert_interop_llamacpp.py (built from source)
# Run with the project's venv active (`python` = that venv). Idempotent: anything already
# installed at the pinned version is skipped, so a second run takes about a second.
# pip caches the llama-cpp-python wheel it builds (~15-20 min on 2 cores the first time).
# Exits non-zero if something could not be installed; the tests then skip and say why.
set -uo pipefail
cd "$(dirname "$0")/.."

# The project's venv: $VENV, else ./.venv, else the `python` on PATH (.ci/run puts the venv
# first). Never a system interpreter: the guard below refuses one.
if [ -n "${VENV:-}" ] && [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"
elif [ -x .venv/bin/python ]; then
  PY="$PWD/.venv/bin/python"
else
  PY=python
fi
if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "interop: $PY is not a virtualenv's python; not installing into it"
  exit 1
fi
TORCH_VERSION=2.13.0
PEFT_VERSION=0.21.2
LLAMA_CPP_PYTHON_VERSION=0.3.36
status=0

have() {  # have DIST VERSION: the distribution is installed at that version (local tags ignored)
  "$PY" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

pip_install() {  # quiet pip install; prints pip's output (minus find-links noise), keeps its status
  local log rc
  log=$(mktemp)
  "$PY" -m pip install -q "$@" >"$log" 2>&1
  rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return $rc
}

# torch: the pinned version resolves to the local CPU wheel (pip's find-links), no CUDA.
if have torch "$TORCH_VERSION"; then
  echo "interop: torch $TORCH_VERSION present"
else
  echo "interop: installing torch==$TORCH_VERSION (CPU)"
  pip_install "torch==$TORCH_VERSION" || { echo "interop: torch install failed"; status=1; }
fi

if have peft "$PEFT_VERSION"; then
  echo "interop: peft $PEFT_VERSION present"
else
  echo "interop: installing peft==$PEFT_VERSION"
  pip_install "peft==$PEFT_VERSION" || { echo "interop: peft install failed"; status=1; }
fi

# llama-cpp-python is sdist-only on PyPI: CPU-only build of just the libraries the bindings
# load (no examples, tests, tools, server, multimodal, OpenSSL; portable AVX2 level, not
# -march=native, so the cached wheel does not depend on this exact CPU).
if have llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION"; then
  echo "interop: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION present"
else
  echo "interop: installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (from source if not cached)"
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    pip_install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
    || { echo "interop: llama-cpp-python build failed (needs cmake and a C++ compiler)"; status=1; }
  echo "interop: llama-cpp-python step took $(( $(date +%s) - start ))s"
fi

# Cheap final check: llama_cpp's shared library loads; torch/peft are at least findable
# (importing torch takes seconds; the tests import it anyway).
"$PY" -c "import importlib.util as u, llama_cpp; assert u.find_spec('torch') and u.find_spec('peft')" \
  || { echo "interop: consumers not importable"; status=1; }
exit $status
