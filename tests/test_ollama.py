"""`--model ollama:NAME[:TAG]` and `convert to-ollama`, on an Ollama store the tests build
(tests/ollama_store.py: manifests + sha256 blobs around a toy GGUF; no Ollama install).
Every command runs as the user runs it (a subprocess with OLLAMA_MODELS set); the store is
checked byte for byte to be untouched afterwards."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.model.load import adapter_config, apply_lora, load_base, resolve_model_path
from mlx_kto.model.ollama import is_gguf_file, parse_name
from mlx_kto.reference.fingerprint import weights_digest

import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits
from assets_smollm2 import smollm2_gguf  # noqa: F401  (fixture)
from feedback_fixtures import write_chat_feedback
from ollama_store import add_model, write_manifest
from toy_gguf import write_toy_gguf

TOKENS = [1, 5, 9, 30, 40, 7, 3, 11, 2, 17]


def snapshot(store: Path) -> dict:
    """Every entry of the store: kind, size, mtime and (files) bytes."""
    out = {}
    for p in sorted(store.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(store))] = (p.is_dir(), st.st_size, st.st_mtime_ns,
                                          None if p.is_dir() else p.read_bytes())  # fmt: skip
    return out


def write_data(path: Path, n: int = 8) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            good = i % 2 == 0
            reply = " Sure, happy to help." if good else " Go away."
            f.write(json.dumps({"prompt": f"Tell me about {i}.", "completion": reply,
                                "label": good}) + "\n")  # fmt: skip
    return path


def cli(*args, env=None, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *map(str, args)], capture_output=True,
        text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout,
    )  # fmt: skip


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def toy(tiny_llama, tmp_path_factory):
    """(store, toy .gguf, its blob, feedback file): the toy Llama as Ollama model toy:latest
    and me/toy:v1 (one blob, hard-linked)."""
    d = tmp_path_factory.mktemp("ollama")
    gguf = write_toy_gguf(tiny_llama, d / "toy.gguf")
    store = d / "store"
    blob = add_model(store, "toy:latest", gguf)
    add_model(store, "me/toy:v1", gguf)
    return store, gguf, blob, write_data(d / "data.jsonl")


@pytest.fixture
def store_env(toy, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(toy[0]))
    return {"OLLAMA_MODELS": str(toy[0])}


def test_names_resolve_to_the_model_blob(toy, store_env, monkeypatch):
    store, gguf, blob, _ = toy
    before = snapshot(store)
    for ref in ("ollama:toy", "ollama:toy:latest", "ollama:TOY:Latest", "ollama:me/toy:v1",
                "ollama:registry.ollama.ai/me/toy:v1", "ollama:library/toy"):  # fmt: skip
        assert resolve_model_path(ref) == blob, ref
    assert parse_name("ollama:me/toy:v1").short() == "me/toy:v1"
    assert parse_name("ollama:x.example.com/me/toy").short() == "x.example.com/me/toy:latest"
    monkeypatch.setenv("OLLAMA_MODELS", f' "{store}" ')  # as Ollama reads it: quotes stripped
    assert resolve_model_path("ollama:toy") == blob
    monkeypatch.delenv("OLLAMA_MODELS")
    home = store.parent / "home"
    (home / ".ollama").mkdir(parents=True, exist_ok=True)
    if not (home / ".ollama" / "models").exists():
        (home / ".ollama" / "models").symlink_to(store)
    monkeypatch.setenv("HOME", str(home))  # the default store: ~/.ollama/models
    assert resolve_model_path("ollama:toy") == home / ".ollama" / "models" / blob.relative_to(store)
    # The blob has no suffix: GGUF by its magic; the reference fingerprint keys its bytes
    # exactly as it keys the same bytes in a .gguf file.
    assert blob.suffix == "" and is_gguf_file(blob) and not is_gguf_file(store / "manifests")
    assert weights_digest(blob) == weights_digest(gguf)
    assert snapshot(store) == before


def _mamba_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _layer(store, data: bytes, media="application/vnd.ollama.image.model"):
    import hashlib

    hexd = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{hexd}").write_bytes(data)
    return {"mediaType": media, "digest": f"sha256:{hexd}", "size": len(data)}


def _bad_store(kind: str, root: Path, gguf: Path) -> tuple[Path, str, list[str]]:
    """(store, ref, words the one-line error must hold) for one kind of broken store."""
    store = root / kind
    store.mkdir()
    ref = "ollama:m"
    if kind == "not-in-store":
        add_model(store, "other:7b", gguf)
        add_model(store, "me/third:q4", gguf)
        return store, "ollama:missing", ["ollama:missing:latest is not in the Ollama store",
                                          "me/third:q4", "other:7b", "ollama pull"]  # fmt: skip
    if kind == "no-store":
        return store, ref, ["no Ollama store", "OLLAMA_MODELS"]
    if kind == "bad-name":
        add_model(store, "m", gguf)
        return store, "ollama:../../etc/passwd", ["not an Ollama model name"]
    if kind == "malformed-json":
        p = write_manifest(store, "m", [], text='{"layers": [')
        return store, ref, [str(p), "not valid JSON"]
    if kind == "no-model-layer":
        tmpl = _layer(store, b"{{ .Prompt }}", "application/vnd.ollama.image.template")
        p = write_manifest(store, "m", [tmpl])
        return store, ref, [str(p), "no model layer", "application/vnd.ollama.image.template"]
    if kind == "adapter-layer":
        layers = [_layer(store, gguf.read_bytes()),
                  _layer(store, b"GGUF lora", "application/vnd.ollama.image.adapter")]  # fmt: skip
        write_manifest(store, "m", layers)
        return store, ref, ["carries a LoRA adapter layer", "base model"]
    if kind == "arch":
        write_manifest(store, "m", [_layer(store, _mamba_gguf(root / "mamba.gguf").read_bytes())])
        return store, ref, ["ollama:m:latest", "architecture 'mamba' cannot be loaded"]
    blob = add_model(store, "m", gguf, link=False)  # damaged below: never the shared file
    if kind == "missing-blob":
        blob.unlink()
        return store, ref, [str(blob), "missing", "ollama pull m:latest"]
    if kind == "partial-download":
        blob.rename(blob.with_name(blob.name + "-partial"))
        return store, ref, [str(blob), "partial download"]
    if kind == "truncated-blob":
        blob.write_bytes(gguf.read_bytes()[:1000])
        return store, ref, [str(blob), "has 1000 bytes, its manifest says", "truncated"]
    if kind == "damaged-blob":  # same size, other bytes
        data = bytearray(gguf.read_bytes())
        data[-1] ^= 0xFF
        blob.write_bytes(bytes(data))
        return store, ref, [str(blob), "does not match its sha256"]
    raise AssertionError(kind)


BAD = ["not-in-store", "no-store", "bad-name", "malformed-json", "no-model-layer",
       "adapter-layer", "arch", "missing-blob", "partial-download", "truncated-blob",
       "damaged-blob"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_a_broken_store_is_one_line(kind, toy, tmp_path, monkeypatch):
    store, ref, words = _bad_store(kind, tmp_path, toy[1])
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    before = snapshot(store)
    with pytest.raises(UserError) as e:
        load_base(KTOConfig(model=ref), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert snapshot(store) == before


@pytest.mark.parametrize("kind", ["not-in-store", "truncated-blob"])
def test_a_broken_store_through_the_cli(kind, toy, tmp_path):
    store, ref, words = _bad_store(kind, tmp_path, toy[1])
    r = cli("train", "--model", ref, "--data", toy[3], "--adapter-path", tmp_path / "run",
            "--iters", "1", env={"OLLAMA_MODELS": str(store)})  # fmt: skip
    line = one_error_line(r)
    assert all(w in line for w in words), line
    assert not (tmp_path / "run" / "adapters.safetensors").exists()


@pytest.mark.slow  # every command as a process: ~40 s
def test_every_command_takes_an_ollama_name(toy, store_env, tmp_path):
    """train (2 steps), eval (the run's model), generate, cache warm, data check, chat's
    loader: through `ollama:toy:latest`, as with the .gguf file itself."""
    store, gguf, blob, data = toy
    before = snapshot(store)
    cache = tmp_path / "refcache"
    env = {**store_env, "MLX_KTO_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    r = cli("train", "--model", "ollama:toy:latest", "--data", data, "--adapter-path",
            tmp_path / "run", "--iters", "2", "--batch-size", "2", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    print(f"toy: 2-step train through ollama:toy:latest {time.perf_counter() - t0:.1f}s")
    conf = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert conf["model"] == "ollama:toy:latest"
    assert conf["ollama"] == {"name": "toy:latest", "digest": "sha256:" + blob.name[7:]}
    assert "step 2/2" in r.stderr

    r = cli("eval", "--adapter-path", tmp_path / "run", "--split", "train", env=env)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["rows"] == 8 and np.isfinite(ev["loss"]), r.stdout

    gen = ["generate", "--prompt", "Tell me about 3.", "--max-tokens", "6", "--quiet",
           "--adapter-path", tmp_path / "run"]  # fmt: skip
    r1 = cli(*gen, "--model", "ollama:toy", env=env)
    r2 = cli(*gen, "--model", gguf, env=env)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr)
    assert r1.stdout.strip() and r1.stdout == r2.stdout

    # cache warm keys the blob's bytes: the same bytes as a .gguf file hit every entry.
    warm = ["cache", "warm", "--data", data, "--batch-size", "2"]
    r = cli(*warm, "--model", "ollama:toy", env=env)
    assert r.returncode == 0, r.stderr
    r = cli(*warm, "--model", gguf, env=env)
    assert r.returncode == 0 and "cache warm: 0 sequences computed" in r.stderr, r.stderr
    r = cli("cache", "clear", "--model", "ollama:toy", env=env)
    assert r.returncode == 0 and r.stdout.startswith("removed ") and " 0 entries" not in r.stdout

    r = cli("data", "check", data, "--model", "ollama:toy", env=env)
    assert r.returncode == 0 and "8 of 8 rows kept" in r.stdout, r.stdout + r.stderr

    from mlx_kto.collect.session import load_chat_model

    m, tok = load_chat_model("ollama:me/toy:v1", str(tmp_path / "run"))
    assert tok.chat_template and m(mx.array([TOKENS])).shape[1] == len(TOKENS)
    assert snapshot(store) == before


def random_lora_run(model_ref: str, out: Path, seed=0):
    """An adapter on `model_ref` with random non-zero lora_b (a clear effect to compare),
    saved as training saves it; returns (run folder, the model with the adapter)."""
    from mlx_kto.model.load import save_adapter

    cfg = KTOConfig(model=model_ref, lora_rank=4, num_layers=2, seed=seed).validate()
    model, _, _, _ = load_base(cfg, log=lambda *_: None)
    apply_lora(model, cfg)
    for i, (_, m) in enumerate(model.named_modules()):
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(seed * 97 + i))
    model.eval()
    save_adapter(model, out, adapter_config(cfg, model_ref, 2))
    return out, model


def test_to_ollama_writes_a_modelfile_and_a_lora_that_llama_cpp_applies(toy, store_env, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (CI builds it: .ci/interop.sh)"
    )
    from mlx_kto.export.gguf_base import describe
    from mlx_kto.export.gguf_lora import check_lora, read_lora_file
    from mlx_kto.model.load import reference_mode

    store, gguf, blob, _ = toy
    before = snapshot(store)
    run, model = random_lora_run("ollama:toy", tmp_path / "run")
    r = cli("convert", "to-ollama", run, tmp_path / "out", env=store_env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert (out / "Modelfile").read_text() == "FROM toy:latest\nADAPTER ./adapter.gguf\n"
    assert f"ollama create NEW_NAME -f {out / 'Modelfile'}" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf"]
    # The LoRA's tensors fit the blob exactly as llama.cpp's loader checks them.
    _, base_tensors, arch, _ = describe(gguf)
    lora = read_lora_file(out / "adapter.gguf")
    check_lora(lora, arch, base_tensors)
    assert len(lora.tensors) == 2 * 7 * 2  # 7 linears per block, 2 blocks, A and B

    def cpp(lora_path=None):
        kw = {"lora_path": str(lora_path)} if lora_path else {}
        llm = llama_cpp.Llama(model_path=str(blob), n_ctx=64, n_batch=64, n_threads=2,
                              logits_all=True, verbose=False, seed=0, type_k=0, type_v=0, **kw)  # fmt: skip
        llm.eval(TOKENS)
        scores = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
        llm.close()
        return scores

    with reference_mode(model):
        want_base = logits(model, TOKENS)
    want = logits(model, TOKENS)
    assert np.abs(want - want_base).max() > 0.1  # the adapter moves the logits clearly
    np.testing.assert_allclose(cpp(), want_base, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cpp(out / "adapter.gguf"), want, atol=1e-4, rtol=0)

    # A file base: FROM its absolute path; the same LoRA bytes as for the blob.
    r = cli("convert", "to-ollama", run, "out2", "--base", gguf, env=store_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out2" / "Modelfile").read_text().splitlines() == [
        f"FROM {gguf.resolve()}", "ADAPTER ./adapter.gguf"]  # fmt: skip
    assert (tmp_path / "out2" / "adapter.gguf").read_bytes() == (out / "adapter.gguf").read_bytes()
    assert snapshot(store) == before


def test_to_ollama_refuses_before_writing(toy, tiny_llama, tmp_path, monkeypatch):
    """An existing OUT (without --overwrite), a base re-pulled since training, a base that is
    no GGUF: one line each, nothing written, nothing deleted."""
    store = tmp_path / "store"
    blob = add_model(store, "toy:latest", toy[1])
    env = {"OLLAMA_MODELS": str(store)}
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    run, _ = random_lora_run("ollama:toy", tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_error_line(cli("convert", "to-ollama", run, out, env=env))
    assert f"{out}: folder exists and is not empty" in line and "--overwrite" in line
    r = cli("convert", "to-ollama", run, out, "--overwrite", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf", "notes.txt"]

    line = one_error_line(cli("convert", "to-ollama", run, tmp_path / "o2", "--base",
                              toy[3], env=env))  # fmt: skip
    assert "not a GGUF file" in line and "ollama:NAME" in line

    # `ollama pull` moved toy:latest to other weights: the LoRA was trained on the old blob.
    new = write_toy_gguf(tiny_llama, tmp_path / "f16.gguf", {"*": "F16"})  # same shapes
    new_blob = add_model(store, "toy:latest", new)
    assert new_blob != blob
    line = one_error_line(cli("convert", "to-ollama", run, tmp_path / "o3", env=env))
    assert f"the run trained on blob sha256:{blob.name[7:]}" in line
    assert f"now sha256:{new_blob.name[7:]}" in line
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_lmstudio_names_pick_the_folders_gguf(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".lmstudio" / "models" / "pub" / "toy-GGUF"
    folder.mkdir(parents=True)
    (folder / "toy-Q8_0.gguf").write_bytes(toy[1].read_bytes())
    (folder / "mmproj-toy-f16.gguf").write_bytes(b"GGUF")  # a vision projector: not a model
    assert resolve_model_path("lmstudio:pub/toy-GGUF") == folder / "toy-Q8_0.gguf"
    (folder / "toy-F32.gguf").write_bytes(toy[1].read_bytes())
    with pytest.raises(
        UserError, match="holds 2 GGUF files; name one: lmstudio:pub/toy-GGUF/toy-F32"
    ):
        resolve_model_path("lmstudio:pub/toy-GGUF")
    assert resolve_model_path("lmstudio:pub/toy-GGUF/toy-F32.gguf") == folder / "toy-F32.gguf"
    with pytest.raises(UserError, match="no folder pub/nope"):
        resolve_model_path("lmstudio:pub/nope")
    with pytest.raises(UserError, match="not an LM Studio model"):
        resolve_model_path("lmstudio:../x/y")


@pytest.mark.slow
def test_the_round_trip_on_smollm2_from_an_ollama_store(smollm2_gguf, tmp_path):  # noqa: F811
    """The README's round trip on the real SmolLM2 Q4_1 GGUF as an Ollama blob: `train
    --model ollama:smollm2:135m` (2 steps, timed), `convert to-ollama`, and llama.cpp runs
    the blob with adapter.gguf, moving the logits as MLX's adapter moves them."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from mlx_kto.model.load import load_gguf_for_inference, reference_mode

    store = tmp_path / "store"
    blob = add_model(store, "smollm2:135m", smollm2_gguf)
    before = snapshot(store)
    env = {"OLLAMA_MODELS": str(store), "MLX_KTO_CACHE_DIR": str(tmp_path / "cache")}
    data = write_chat_feedback(tmp_path / "feedback.jsonl")
    t0 = time.perf_counter()
    r = cli("train", "--model", "ollama:smollm2:135m", "--data", data, "--adapter-path",
            tmp_path / "run", "--iters", "2", "--batch-size", "2", "--max-length", "48",
            "--learning-rate", "3e-3", "--num-layers", "4", "--lora-rank", "4",
            "--steps-per-eval", "0", env=env)  # fmt: skip
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "Q4_1: 210 tensors kept quantized" in r.stderr, r.stderr
    # The trained adapter's effect after 2 steps depends on the trajectory (BLAS, CPU); the
    # comparison below checks the export, so it uses the same keys and shapes with fixed,
    # seeded values of a known size (what any machine reproduces).
    weights = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    rng = np.random.default_rng(0)
    fixed = {
        k: mx.array(rng.normal(0, 0.02, v.shape).astype(np.float32)) for k, v in weights.items()
    }
    mx.save_safetensors(str(tmp_path / "run" / "adapters.safetensors"), fixed)
    r = cli("convert", "to-ollama", tmp_path / "run", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert (out / "Modelfile").read_text() == "FROM smollm2:135m\nADAPTER ./adapter.gguf\n"
    print(f"SmolLM2 via ollama:smollm2:135m: 2-step train {wall:.1f}s wall (subprocess)")

    model, tok = load_gguf_for_inference(blob, str(tmp_path / "run"), log=lambda *_: 0)
    chat = [{"role": "user", "content": "What do cows drink?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    tokens = tok.encode(text + "Happy to help! Water.", add_special_tokens=False)
    want = logits(model, tokens)
    with reference_mode(model):
        want_base = logits(model, tokens)
    kw = dict(n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False, seed=0,
              type_k=0, type_v=0)  # fmt: skip
    scores = []
    for extra in ({}, {"lora_path": str(out / "adapter.gguf")}):
        llm = llama_cpp.Llama(model_path=str(blob), **kw, **extra)
        llm.eval(tokens)
        scores.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
        llm.close()
    effect_mlx, effect_cpp = want - want_base, scores[1] - scores[0]
    assert np.abs(effect_cpp).max() > 0  # llama.cpp applied the LoRA
    corr = np.corrcoef(effect_mlx.ravel(), effect_cpp.ravel())[0, 1]
    print(f"LoRA effect: max |MLX| {np.abs(effect_mlx).max():.3f}, corr with llama.cpp {corr:.4f}")
    # Loose on purpose: llama.cpp rounds activations to 8 bits on the Q4_1 file itself (0.69
    # measured with this fixed adapter); the exact agreement (to 2e-3, on llama.cpp's float32
    # copy of the file) is tests/test_real_smollm2.py's. Here: the blob takes the adapter.
    assert corr > 0.5, corr
    assert snapshot(store) == before
