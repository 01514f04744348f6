"""Run `mlx-kto` as a user does: the console script as a subprocess (this checkout's
code first on PYTHONPATH), a tiny adapter trained by `mlx-kto demo`, and a web chat
launched with `--port 0` whose URL is read from what it prints."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "mlx_kto" / "demo" / "assets" / "model"
_RUNS: dict[str, Path] = {}  # one demo adapter per test process


def mlx_kto() -> list[str]:
    """The `mlx-kto` command (the venv's console script; `python -m` where it is missing)."""
    script = Path(sys.executable).with_name("mlx-kto")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlx_kto.cli"]


def cli_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], cwd, timeout: float = 600, ok: bool = True):
    """`mlx-kto ARGS` to completion; asserts exit code 0 when `ok`."""
    p = subprocess.run(
        mlx_kto() + [str(a) for a in args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if ok:
        assert p.returncode == 0, f"mlx-kto {' '.join(map(str, args))}:\n{p.stdout}\n{p.stderr}"
    return p


def demo_adapter(tmp_path_factory) -> Path:
    """A tiny adapter on the shipped demo model: `mlx-kto demo --quick --out RUN`
    (two steps; trained once per test process)."""
    if "run" not in _RUNS:
        out = tmp_path_factory.mktemp("demo_run") / "RUN"
        run_cli(["demo", "--quick", "--steps", "2", "--samples", "1", "--out", out], out.parent)
        assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
        _RUNS["run"] = out
    return _RUNS["run"]


class WebChat:
    """`mlx-kto chat --web ... --port 0` as a subprocess; `.port` from its printed URL."""

    def __init__(self, args: list[str], cwd, timeout: float = 120):
        self.proc = subprocess.Popen(
            mlx_kto() + ["chat", "--web", "--port", "0"] + [str(a) for a in args],
            cwd=cwd,
            env={**cli_env(), "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread's stack
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        found = threading.Event()
        self.port = None

        def pump(stream, sink):
            for line in stream:
                sink.append(line)
                m = re.search(r"open http://127\.0\.0\.1:(\d+)/", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    found.set()
            found.set()  # the process ended

        self._threads = [
            threading.Thread(target=pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()
        found.wait(timeout)
        if self.port is None:
            self.proc.kill()
            raise AssertionError(f"no URL printed:\n{''.join(self.out)}\n{''.join(self.err)}")
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        """Ctrl-C, as a user stops it; returns the exit code (see `wait`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(30)

    def wait(self, timeout: float) -> int | None:
        """The exit code once the process ends, or None when it is still running after
        `timeout` s: a hang, so faulthandler prints where each thread is (into `.stderr`)
        before the process is killed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._join()
            return None
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    @property
    def log(self) -> str:
        """What it printed: stderr, then stdout."""
        return self.stderr + "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)
