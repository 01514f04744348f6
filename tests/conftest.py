"""Shared fixtures: tiny offline models and tokenizers built in-process."""

import os
import tempfile

os.environ.setdefault("MLX_KTO_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never touch the user's reference cache from tests.
os.environ.setdefault("MLX_KTO_CACHE_DIR", tempfile.mkdtemp(prefix="mlx_kto_test_refcache_"))

import mlx_kto  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig  # noqa: E402
from mlx_kto.model.load import apply_lora, load_base  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from feedback_fixtures import quick_cfg, write_feedback  # noqa: E402
from mlx_lm.utils import load_tokenizer  # noqa: E402
from toy import build_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Path of a random-init 2-layer Llama (HF format) with a toy BPE tokenizer."""
    return build_model(tmp_path_factory.mktemp("tiny_llama"), family="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Path of a random-init 2-layer Qwen2 (tied embeddings, qkv bias)."""
    return build_model(tmp_path_factory.mktemp("tiny_qwen2"), family="qwen2", seed=1)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    """The toy tokenizer as a transformers tokenizer (BOS `<s>`, EOS `</s>`, chat template)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    """The toy tokenizer wrapped as mlx-lm's TokenizerWrapper (what training uses)."""
    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def lora_model(tiny_llama):
    """(model, cfg): the tiny Llama with rank-4 LoRA and non-zero lora_b (so every LoRA
    matrix has a gradient), in train mode; one per test module."""
    cfg = KTOConfig(model=str(tiny_llama), lora_rank=4, seed=0).validate()
    model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.05
    model.train()
    return model, cfg


@pytest.fixture(scope="session")
def feedback_dir(tmp_path_factory):
    """A data folder of separable labelled rows (tests/feedback_fixtures.py): train.jsonl
    (64 rows) and valid.jsonl (16 rows). Shared by the session: read it, never write to it."""
    d = tmp_path_factory.mktemp("feedback")
    write_feedback(d / "train.jsonl", 64, seed=0)
    write_feedback(d / "valid.jsonl", 16, seed=1)
    return d


@pytest.fixture
def feedback_file(tmp_path):
    """A small labelled JSON-lines file of this test's own (16 rows, polite True, rude False)."""
    return write_feedback(tmp_path / "feedback.jsonl", 16, seed=0)


@pytest.fixture(scope="session")
def quick_config(tiny_llama):
    """quick_config(data, out, **overrides) -> KTOConfig: a short run on the tiny Llama
    (feedback_fixtures.quick_cfg; pass model=... for another model)."""

    def make(data, out, **kw):
        return quick_cfg(kw.pop("model", tiny_llama), data, out, **kw)

    return make
