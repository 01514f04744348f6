"""The OpenBLAS lookup: linker cache and known paths only, never a filesystem walk."""

import os
import subprocess
import sys
import types

from mlx_kto.runtime import blas as _blas


def _fake_run(output):
    def run(*args, **kwargs):
        return types.SimpleNamespace(stdout=output, returncode=0)

    return run


def test_lookup_reads_the_linker_cache(tmp_path, monkeypatch):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    serial = tmp_path / "libopenblasp.so"
    serial.write_bytes(b"")
    out = (
        "123 libs found in cache `/etc/ld.so.cache'\n"
        f"\tlibopenblasp.so (libc6,x86-64) => {serial}\n"
        f"\tlibopenblas.so.0 (libc6,x86-64) => {lib}\n"
        "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"
    )
    monkeypatch.setattr(_blas, "_CANDIDATES", [])
    monkeypatch.delenv("MLX_KTO_OPENBLAS", raising=False)
    monkeypatch.setattr(_blas.subprocess, "run", _fake_run(out))
    assert _blas.find_openblas() == str(lib)


def test_lookup_absent_returns_none(monkeypatch):
    monkeypatch.setattr(_blas, "_CANDIDATES", ["/nonexistent/libopenblas.so.0"])
    monkeypatch.delenv("MLX_KTO_OPENBLAS", raising=False)
    monkeypatch.setattr(_blas.subprocess, "run", _fake_run("0 libs found\n"))
    assert _blas.find_openblas() is None


def test_lookup_survives_a_symlink_loop(tmp_path):
    # Debian's llvm-14 ships a build folder whose symlinks point back at their parents; a
    # recursive glob under /usr/lib* never returned. The lookup must finish promptly with such a
    # loop where a walk would find it.
    loop = tmp_path / "usr" / "lib" / "llvm-14" / "build"
    loop.mkdir(parents=True)
    os.symlink("..", loop / "Debug+Asserts")
    os.symlink("..", loop / "Release")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import importlib.util as u\n"
        f"spec = u.spec_from_file_location('b', {_blas.__file__!r}); b = u.module_from_spec(spec)\n"
        "spec.loader.exec_module(b)\n"
        "b._CANDIDATES = []\n"
        "print(b.find_openblas())\n"
    )
    env = dict(os.environ, MLX_KTO_OPENBLAS="")
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=20, capture_output=True
    )
    assert res.returncode == 0, res.stderr
