"""Reference log-prob cache: values, laziness, what misses, crash safety, corruption, CLI."""

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

from mlx_kto.cli.cache import cache as cache_group
from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.data.batches import iterate_batches
from mlx_kto.data.rows import load_examples
from mlx_kto.data.tokenize import assign_kl_partners, tokenize_examples
from mlx_kto.reference.fingerprint import file_digest, reference_fingerprint
from mlx_kto.reference.scorer import (
    DB_NAME,
    RefCache,
    ReferenceScorer,
    default_cache_dir,
    entry_key,
    reference_forward,
)
from mlx_kto.train.run import train

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

GOOD = [" Sure, I would be happy to help you.", " Of course! Here is what you need to know."]
BAD = [" Go away, I do not care.", " No. Figure it out yourself."]
TOPICS = ["sky", "sea", "cat", "hat", "story", "poem", "answer", "homework", "grass", "light"]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Whatever a test forgets to pass, the default cache folder is a temporary one."""
    monkeypatch.setenv("MLX_KTO_CACHE_DIR", str(tmp_path / "default_cache"))


def write_feedback(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            topic = " ".join(rng.sample(TOPICS, 2))
            label = i % 2 == 0
            completion = rng.choice(GOOD if label else BAD)
            row = {
                "prompt": f"Tell me about the {topic}.",
                "completion": completion,
                "label": label,
            }
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("feedback")
    write_feedback(d / "train.jsonl", 16, seed=0)
    write_feedback(d / "valid.jsonl", 8, seed=1)
    return d


@pytest.fixture(scope="module")
def ref_model(tiny_llama):
    """The tiny Llama with LoRA whose B is non-zero: the adapter-off path really matters."""
    from mlx_kto.model.load import apply_lora, lora_modules

    from mlx_lm import load

    model, _ = load(str(tiny_llama))
    apply_lora(model, KTOConfig(lora_rank=4))
    for m in lora_modules(model):
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(3))
    return model


def make_rows(tokenizer, data_dir, max_length=64, seed=0):
    rows, _ = tokenize_examples(load_examples(data_dir / "train.jsonl"), tokenizer, max_length)
    assign_kl_partners(rows, seed=seed, max_length=max_length)
    return rows


def score_all(scorer, rows, batch_size=4, with_kl=True):
    """(ref [N], kl [N]) in row order, one scorer call per micro-batch."""
    refs, kls = [], []
    for _, _, b in iterate_batches(rows, batch_size, shuffle=False, loop=False, with_kl=with_kl):
        ref, kl = scorer(b)
        refs.append(np.array(ref))
        kls.append(np.array(kl) if kl is not None else np.zeros(0))
    return np.concatenate(refs), np.concatenate(kls)


def fp_of(model_path, **kw):
    return reference_fingerprint(model_path, **kw)


# -- values ------------------------------------------------------------------------------


def test_cached_equals_fresh_and_second_pass_runs_no_forward(
    ref_model, tiny_llama, tokenizer, data_dir, tmp_path
):
    rows = make_rows(tokenizer, data_dir)
    fresh = ReferenceScorer(ref_model)  # no cache: the original all-rows forward
    want_ref, want_kl = score_all(fresh, rows)
    fp = fp_of(tiny_llama)

    cache = RefCache(tmp_path / "c")
    first = ReferenceScorer(ref_model, cache=cache, fingerprint=fp)
    got_ref, got_kl = score_all(first, rows)
    assert first.forwards > 0 and first.misses > 0
    cache.close()

    again = ReferenceScorer(ref_model, cache=RefCache(tmp_path / "c"), fingerprint=fp)
    hit_ref, hit_kl = score_all(again, rows)
    assert again.forwards == 0 and again.misses == 0 and again.hits == 2 * len(rows)
    # What the cache returns is bit for bit what was computed and stored.
    np.testing.assert_array_equal(hit_ref, got_ref)
    np.testing.assert_array_equal(hit_kl, got_kl)
    # Fresh values from differently padded batches agree to float32 accuracy: sums near -100
    # have an ulp of 7.6e-6, so a few ulps of padding-dependent rounding are allowed (rtol).
    np.testing.assert_allclose(hit_ref, want_ref, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(hit_kl, want_kl, atol=1e-5, rtol=1e-6)
    # One sequence alone (no padding, no neighbours) gives the same value as the cache.
    r = rows[5]
    toks = mx.array([r.tokens])
    mask = mx.array([[i >= len(r.prompt_ids) for i in range(len(r.tokens))]])
    alone = reference_forward(ref_model, toks, mask).item()
    assert abs(alone - hit_ref[5]) <= 1e-5 + 1e-6 * abs(alone)
    # The stored token count is the completion length.
    key = entry_key(fp.id, r.tokens, len(r.prompt_ids))
    assert again.cache.get_many([key])[key][1] == len(r.completion_ids)


def test_only_misses_are_computed_in_one_forward(
    ref_model, tiny_llama, tokenizer, data_dir, tmp_path
):
    rows = make_rows(tokenizer, data_dir)
    fp = fp_of(tiny_llama)
    scorer = ReferenceScorer(ref_model, cache=RefCache(tmp_path / "c"), fingerprint=fp)
    batches = [b for _, _, b in iterate_batches(rows, 4, shuffle=False, loop=False)]
    scorer(batches[0])
    # A batch mixing two cached rows with two new ones: one forward over the new sequences only.
    from mlx_kto.data.batches import make_batch

    mixed = make_batch(rows, batches[0].index[:2] + batches[1].index[:2])
    new_seqs = {(tuple(rows[i].tokens)) for i in batches[1].index[:2]}
    new_seqs |= {(tuple(rows[i].kl_tokens)) for i in batches[1].index[:2]}
    old_seqs = {tuple(rows[i].tokens) for i in batches[0].index} | {
        tuple(rows[i].kl_tokens) for i in batches[0].index
    }
    fresh_needed = len(new_seqs - old_seqs)
    before = scorer.stats()
    scorer(mixed)
    after = scorer.stats()
    assert after["ref_forwards"] - before["ref_forwards"] == 1
    assert after["ref_rows_computed"] - before["ref_rows_computed"] == fresh_needed
    assert after["ref_hits"] - before["ref_hits"] >= 4
    # No KL part (apo_zero_unpaired): the main sequences alone, all hits now.
    ref, kl = scorer(make_batch(rows, batches[0].index, with_kl=False))
    assert kl is None and ref.shape == (4,) and scorer.forwards == after["ref_forwards"]


# -- what must miss ----------------------------------------------------------------------


def test_fingerprint_covers_weights_quantization_dtype_and_adapter(tiny_llama, tmp_path):
    from mlx_kto.model.load import adapter_config, apply_lora, lora_modules, save_adapter

    from mlx_lm import load

    memo = RefCache(tmp_path / "c")
    base = fp_of(tiny_llama, memo=memo).id
    assert fp_of(tiny_llama, memo=memo).id == base  # deterministic
    # Moving the model keeps the fingerprint (content, not path); tokenizer files are not in it.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_llama, moved)
    assert fp_of(moved, memo=memo).id == base
    # Base weights: one value changed in place (same file size).
    w = mx.load(str(moved / "model.safetensors"))
    k = sorted(w)[0]
    w[k] = w[k] + 1e-3
    mx.save_safetensors(str(moved / "model.safetensors"), w, metadata={"format": "pt"})
    st = os.stat(moved / "model.safetensors")
    os.utime(moved / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fp_of(moved, memo=memo).id != base
    # Architecture config counts too.
    conf = json.loads((moved / "config.json").read_text())
    shutil.copy(tiny_llama / "model.safetensors", moved / "model.safetensors")
    assert fp_of(moved, memo=memo).id == base
    conf["rms_norm_eps"] = conf.get("rms_norm_eps", 1e-5) * 10
    (moved / "config.json").write_text(json.dumps(conf))
    assert fp_of(moved, memo=memo).id != base
    # Quantization (bits and group size) and dtype.
    variants = {
        fp_of(tiny_llama, quantize=8, memo=memo).id,
        fp_of(tiny_llama, quantize=4, memo=memo).id,
        fp_of(tiny_llama, quantize=8, q_group_size=32, memo=memo).id,
        fp_of(tiny_llama, dtype="bfloat16", memo=memo).id,
        fp_of(tiny_llama, dtype="float16", memo=memo).id,
    }
    assert len(variants) == 5 and base not in variants
    assert fp_of(tiny_llama, q_group_size=32, memo=memo).id == base  # unused without quantize
    # Starting adapter: its weights and its scale, not its dropout.
    model, _ = load(str(tiny_llama))
    cfg = KTOConfig(lora_rank=4)
    apply_lora(model, cfg)
    for m in lora_modules(model):
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1))
    a1 = save_adapter(model, tmp_path / "a1", adapter_config(cfg, str(tiny_llama), 2))
    fa1 = fp_of(tiny_llama, init_adapter=a1, memo=memo).id
    for m in lora_modules(model):
        m.lora_b = m.lora_b * 2
    a2 = save_adapter(model, tmp_path / "a2", adapter_config(cfg, str(tiny_llama), 2))
    assert len({base, fa1, fp_of(tiny_llama, init_adapter=a2, memo=memo).id}) == 3
    conf = json.loads((a1 / "adapter_config.json").read_text())
    conf["lora_parameters"]["dropout"] = 0.3
    (a1 / "adapter_config.json").write_text(json.dumps(conf))
    assert fp_of(tiny_llama, init_adapter=a1, memo=memo).id == fa1
    conf["lora_parameters"]["scale"] = 7.0
    (a1 / "adapter_config.json").write_text(json.dumps(conf))
    assert fp_of(tiny_llama, init_adapter=a1, memo=memo).id != fa1


def test_file_digests_are_memoised_by_path_size_mtime(tiny_llama, tmp_path):
    memo = RefCache(tmp_path / "c")
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    d = file_digest(f, memo)
    st = os.stat(f)
    assert memo.lookup(os.path.realpath(f), st.st_size, st.st_mtime_ns) == d
    # A memo hit is trusted (that is the point: no re-hash of a 4 GB file) ...
    memo.store(os.path.realpath(f), st.st_size, st.st_mtime_ns, "feed")
    assert file_digest(f, memo) == "feed"
    # ... and any write that changes size or mtime re-hashes.
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_digest(f, memo) not in ("feed", d)


def test_changed_weights_quantization_or_adapter_miss(
    ref_model, tiny_llama, tokenizer, data_dir, tmp_path
):
    rows = make_rows(tokenizer, data_dir)[:4]
    cache = RefCache(tmp_path / "c")
    ReferenceScorer(ref_model, cache=cache, fingerprint=fp_of(tiny_llama))(
        next(iterate_batches(rows, 4, shuffle=False, loop=False))[2]
    )
    for other in ("ab" * 32, fp_of(tiny_llama, quantize=8), fp_of(tiny_llama, dtype="float16")):
        s = ReferenceScorer(ref_model, cache=cache, fingerprint=other)
        score_all(s, rows)
        assert s.hits == 0 and s.misses == 8 and s.forwards == 1
    s = ReferenceScorer(ref_model, cache=cache, fingerprint=fp_of(tiny_llama))
    score_all(s, rows)
    assert s.hits == 8 and s.forwards == 0


def test_tokenizer_output_and_max_length_change_the_key(
    ref_model, tiny_llama, tokenizer, data_dir, tmp_path
):
    from mlx_lm.utils import load_tokenizer
    from toy import build_tokenizer

    fp = fp_of(tiny_llama)
    cache = RefCache(tmp_path / "c")
    rows = make_rows(tokenizer, data_dir, max_length=64)
    score_all(ReferenceScorer(ref_model, cache=cache, fingerprint=fp), rows)

    def seqs(rs):
        return [tuple(r.tokens) for r in rs] + [tuple(r.kl_tokens) for r in rs]

    def check(new_rows, fingerprint=fp):
        s = ReferenceScorer(ref_model, cache=cache, fingerprint=fingerprint)
        score_all(s, new_rows)
        old = set(seqs(rows))
        changed = sum(q not in old for q in seqs(new_rows))
        assert changed > 0
        assert s.misses == changed and s.hits == 2 * len(new_rows) - changed

    # max_length 20 cuts some completions (and KL completions): exactly those sequences miss.
    short = make_rows(tokenizer, data_dir, max_length=20)
    assert any(len(a.tokens) != len(b.tokens) for a, b in zip(rows, short, strict=True))
    check(short)
    # Same weights, a tokenizer with other merges: the fingerprint stays, the ids change.
    other = tmp_path / "other_tok"
    shutil.copytree(tiny_llama, other)
    build_tokenizer(
        other, extra_corpus=["Tell me about the sky and the sea, the cat and the hat."] * 40
    )
    assert fp_of(other).id == fp.id
    check(make_rows(load_tokenizer(other), data_dir, max_length=64))


# -- end to end: epochs, resume, sweeps -------------------------------------------------


def run_cfg(model, data, out, **kw):
    base = dict(
        model=str(model), data=str(data), adapter_path=str(out), batch_size=4, epochs=2,
        learning_rate=2e-3, lora_rank=4, lora_alpha=8.0, steps_per_eval=0, steps_per_save=2,
        keep_checkpoints=0, max_length=64, quiet=True, seed=0, warmup_steps=1,
    )  # fmt: skip
    base.update(kw)
    return make_config(None, **base)


def test_epoch_two_resume_and_sweep_run_no_reference_forward(tiny_llama, data_dir, tmp_path):
    cache = str(tmp_path / "cache")
    logs = []
    a = train(run_cfg(tiny_llama, data_dir, tmp_path / "a", ref_cache=cache), log=logs.append)
    epoch_lines = [m for m in logs if m.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "epoch 1: reference" in epoch_lines[0]
    assert epoch_lines[1].startswith("epoch 2: reference 32 hits, 0 misses, 0 forwards")
    lines = [json.loads(x) for x in a.metrics_path.read_text().splitlines()]
    per_epoch = 16 // 4
    assert len(lines) == 2 * per_epoch
    first = lines[per_epoch - 1]
    assert first["ref_forwards_total"] > 0 and first["ref_misses_total"] > 0
    # Second epoch: every sequence is a hit, no forward (per-step counts and running totals).
    second = lines[per_epoch:]
    assert sum(r["ref_forwards"] for r in second) == 0 and sum(r["ref_misses"] for r in second) == 0
    assert all(r["ref_hits"] == 2 * 4 for r in second)  # 4 rows + 4 KL sequences per step
    assert lines[-1]["ref_forwards_total"] == first["ref_forwards_total"]
    assert lines[-1]["ref_hits_total"] - first["ref_hits_total"] == 2 * 16
    # The final eval on valid.jsonl was computed (and stored) by run a.
    assert a.reference["ref_forwards"] > first["ref_forwards_total"]

    # Resumed from step 2: steps 3..8 and the final eval, all from the cache.
    ckpt = a.adapter_path / "checkpoints" / "step_0000002"
    b = train(
        run_cfg(tiny_llama, data_dir, tmp_path / "b", ref_cache=cache, resume=str(ckpt)), **QUIET
    )
    assert b.steps == 8 and b.reference["ref_forwards"] == 0 and b.reference["ref_hits"] > 0
    np.testing.assert_allclose(
        np.array(
            mx.load(str(b.adapter_path / "adapters.safetensors"))[
                "model.layers.0.self_attn.q_proj.lora_b"
            ]
        ),
        np.array(
            mx.load(str(a.adapter_path / "adapters.safetensors"))[
                "model.layers.0.self_attn.q_proj.lora_b"
            ]
        ),
        atol=1e-5,
    )

    # A sweep run: other beta and learning rate, same data and model: no reference forward.
    sweep = dict(beta=0.3, learning_rate=1e-3, epochs=1)
    c = train(run_cfg(tiny_llama, data_dir, tmp_path / "c", ref_cache=cache, **sweep), **QUIET)
    assert c.reference["ref_forwards"] == 0 and c.reference["ref_misses"] == 0
    # ... and it trains exactly as the same run without the cache (cached == fresh, end to end).
    d = train(run_cfg(tiny_llama, data_dir, tmp_path / "d", no_ref_cache=True, **sweep), **QUIET)
    assert d.reference["ref_forwards"] > 0 and d.reference["ref_hits"] == 0
    assert not default_cache_dir().exists()  # --no-ref-cache wrote nothing anywhere
    wc = mx.load(str(c.adapter_path / "adapters.safetensors"))
    wd = mx.load(str(d.adapter_path / "adapters.safetensors"))
    for k in wc:
        np.testing.assert_allclose(np.array(wc[k]), np.array(wd[k]), atol=1e-5)
    assert abs(c.eval_metrics["loss"] - d.eval_metrics["loss"]) < 1e-5


# -- durability -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import mlx_kto
    from mlx_kto.reference.scorer import RefCache, entry_key
    root, mode, tag = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fp = "ab" * 32
    def value(i):
        return -0.25 * i - 1.0
    c = RefCache(root)
    fid = c.register(fp)
    if mode == "kill":
        for step in range(3):  # three committed steps of 500 entries
            c.put_many(fid, [(entry_key(fp, [step, i], 0), value(step * 500 + i), i % 7)
                             for i in range(500)])
        c.db.execute("PRAGMA cache_size=20")  # spill uncommitted pages into the WAL file
        n = [0]
        def trace(sql):
            if sql.startswith("INSERT OR REPLACE INTO entries"):
                n[0] += 1
                if n[0] == 30000:  # in the middle of the fourth step's transaction
                    os.kill(os.getpid(), signal.SIGKILL)
        c.db.set_trace_callback(trace)
        c.put_many(fid, [(entry_key(fp, [3, i], 0), value(1500 + i), i % 7) for i in range(40000)])
        print("not killed", flush=True)
    else:  # two writers at once: shared keys (same values) and keys of their own
        for step in range(40):
            shared = [(entry_key(fp, [9, step, i], 0), value(i), 1) for i in range(50)]
            own = [(entry_key(fp, [tag, step, i], 0), value(tag + i), 2) for i in range(50)]
            c.put_many(fid, shared + own)
            c.get_many([k for k, _, _ in shared])
        assert not c.broken
    """
)


def _child(root, mode, tag=0):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), mode, str(tag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_sigkill_mid_write_leaves_a_readable_cache_with_correct_entries(tmp_path):
    p = _child(tmp_path / "c", "kill")
    out, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, err
    assert "not killed" not in out
    cache = RefCache(tmp_path / "c")
    fp = "ab" * 32
    assert cache.info()["entries"] == 1500  # the three committed steps, none of the fourth
    for step in range(3):
        keys = [entry_key(fp, [step, i], 0) for i in range(500)]
        got = cache.get_many(keys)
        assert len(got) == 500
        for i, k in enumerate(keys):
            assert got[k] == (np.float32(-0.25 * (step * 500 + i) - 1.0), i % 7)
    assert not cache.get_many([entry_key(fp, [3, i], 0) for i in range(100)])
    assert cache.corrupt == 0
    # And the cache still takes writes.
    cache.put_many(cache.register(fp), [(entry_key(fp, [3, 0], 0), 1.5, 1)])
    assert cache.info()["entries"] == 1501


def test_two_processes_share_a_cache(tmp_path):
    procs = [_child(tmp_path / "c", "share", tag) for tag in (100, 200)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cache = RefCache(tmp_path / "c")
    fp = "ab" * 32
    assert cache.info()["entries"] == 40 * 50 * 3
    for tag in (100, 200):
        keys = [entry_key(fp, [tag, s, i], 0) for s in range(40) for i in range(50)]
        got = cache.get_many(keys)
        assert [got[k][0] for k in keys] == [
            np.float32(-0.25 * (tag + i) - 1.0) for s in range(40) for i in range(50)
        ]


# -- corruption ---------------------------------------------------------------------------


def test_corrupted_entries_are_detected_and_recomputed(
    ref_model, tiny_llama, tokenizer, data_dir, tmp_path
):
    rows = make_rows(tokenizer, data_dir)[:4]
    fp = fp_of(tiny_llama)
    cache = RefCache(tmp_path / "c")
    want, want_kl = score_all(ReferenceScorer(ref_model, cache=cache, fingerprint=fp), rows)
    k0 = entry_key(fp.id, rows[0].tokens, len(rows[0].prompt_ids))
    k1 = entry_key(fp.id, rows[1].kl_tokens, len(rows[1].prompt_ids))
    # Entry 0: a wrong value written through SQL (checksum no longer matches).
    (val,) = cache.db.execute("SELECT val FROM entries WHERE key=?", (k0,)).fetchone()
    bad = bytearray(val)
    bad[2] ^= 0x40
    cache.db.execute("UPDATE entries SET val=? WHERE key=?", (bytes(bad), k0))
    (val1,) = cache.db.execute("SELECT val FROM entries WHERE key=?", (k1,)).fetchone()
    cache.close()  # last connection: WAL checkpointed into the main file
    # Entry 1: a bit flipped in the file itself (SQLite keeps no page checksums).
    path = tmp_path / "c" / DB_NAME
    raw = bytearray(path.read_bytes())
    at = raw.find(val1)
    assert at >= 0 and raw.find(val1, at + 1) < 0
    raw[at + 1] ^= 0x01
    path.write_bytes(bytes(raw))

    cache = RefCache(tmp_path / "c")
    s = ReferenceScorer(ref_model, cache=cache, fingerprint=fp)
    got, got_kl = score_all(s, rows)
    seq_keys = [entry_key(fp.id, r.tokens, len(r.prompt_ids)) for r in rows]
    seq_keys += [entry_key(fp.id, r.kl_tokens, len(r.prompt_ids)) for r in rows]
    assert cache.corrupt == 2 and s.forwards == 1 and s.rows_computed == 2
    assert s.misses == sum(k in (k0, k1) for k in seq_keys)  # a sequence may occur twice
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_kl, want_kl, atol=1e-5)
    s2 = ReferenceScorer(ref_model, cache=cache, fingerprint=fp)  # repaired in place
    score_all(s2, rows)
    assert s2.misses == 0 and s2.forwards == 0


def test_unreadable_cache_file_is_moved_aside(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / DB_NAME).write_bytes(b"this is not a database, just junk " * 200)
    logs = []
    cache = RefCache(root, log=logs.append)
    assert any("moved aside" in m for m in logs)
    assert [p.name.startswith(DB_NAME + ".corrupt-") for p in root.iterdir()].count(True) == 1
    fid = cache.register("cd" * 32)
    cache.put_many(fid, [(entry_key("cd" * 32, [1, 2], 1), -3.0, 1)])
    assert cache.info()["entries"] == 1


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_KTO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mlx_kto" / "reference"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mlx_kto" / "reference"
    monkeypatch.setenv("MLX_KTO_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


# -- CLI ------------------------------------------------------------------------------------


def test_cache_warm_info_clear(tiny_llama, data_dir, tmp_path):
    cache = str(tmp_path / "cache")
    common = ["--ref-cache", cache]
    r = CliRunner().invoke(
        cache_group,
        ["warm", "--model", str(tiny_llama), "--data", str(data_dir), "--max-length", "64",
         "--batch-size", "8", *common],
    )  # fmt: skip
    assert r.exit_code == 0, r.output + repr(r.exception)
    info = json.loads(CliRunner().invoke(cache_group, ["info", "--json", *common]).output)
    assert info["entries"] > 0 and len(info["fingerprints"]) == 1
    assert info["fingerprints"][0]["model"] == str(tiny_llama)
    # Training after `warm` (other batch size) reads everything: no reference forward at all.
    res = train(run_cfg(tiny_llama, data_dir, tmp_path / "run", ref_cache=cache, epochs=1), **QUIET)
    assert res.reference["ref_forwards"] == 0 and res.reference["ref_hits"] > 0
    text = CliRunner().invoke(cache_group, ["info", *common]).output
    assert f"{info['entries']} entries" in text and str(tiny_llama) in text
    # clear --model: another model's entries stay, this one's go.
    other = RefCache(cache)
    other.put_many(other.register("ef" * 32), [(entry_key("ef" * 32, [1, 2], 1), -1.0, 1)])
    other.close()
    r = CliRunner().invoke(cache_group, ["clear", "--model", str(tiny_llama), *common])
    assert r.exit_code == 0 and f"removed {info['entries']} entries" in r.output
    assert (
        json.loads(CliRunner().invoke(cache_group, ["info", "--json", *common]).output)["entries"]
        == 1
    )
    r = CliRunner().invoke(cache_group, ["clear", "--model", str(tmp_path / "nothing"), *common])
    assert r.exit_code != 0 and "no cache entries" in str(r.exception)
    r = CliRunner().invoke(cache_group, ["clear", *common])
    assert r.exit_code == 0 and "removed 1 entries" in r.output


def test_cli_cache_command_is_attached():
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", "cache", "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0 and "warm" in p.stdout and "clear" in p.stdout


def test_locked_or_broken_cache_never_stops_scoring(
    ref_model, tiny_llama, tokenizer, data_dir, tmp_path
):
    """A writer holding the lock past the timeout: values still come back, computed."""
    rows = make_rows(tokenizer, data_dir)[:4]
    logs = []
    cache = RefCache(tmp_path / "c", timeout=0.05, log=logs.append)
    s = ReferenceScorer(ref_model, cache=cache, fingerprint=fp_of(tiny_llama))
    blocker = sqlite3.connect(tmp_path / "c" / DB_NAME, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    got, _ = score_all(s, rows)
    blocker.execute("ROLLBACK")
    want, _ = score_all(ReferenceScorer(ref_model), rows)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert cache.broken and any("disabled" in m for m in logs)
