"""What the resident memory of a training run is made of, over time (Linux, glibc).

    .venv/bin/python bench/rss_probe.py                 # h2h's mlx-kto run, 32 rows x 2 epochs
    .venv/bin/python bench/rss_probe.py --rows 256 --epochs 3   # the full h2h shape
    .venv/bin/python bench/rss_probe.py -- --model DIR --data FILE ...   # any train command

Runs `python -m mlx_kto.train` in this process (as bench/h2h_mlx_runner.py does, on h2h's
fixture and settings unless train arguments follow `--`) while a thread samples, every 20 ms:
VmRSS (anonymous / file-backed), MLX's active and cached bytes, and glibc's heap (mallinfo2:
bytes taken from the system, in use, free). JSON lines: the sample at the resident peak, the
sample at MLX's active peak, and the largest mappings (smaps) near the resident peak. The
difference between glibc's "in use" and MLX's active + cached bytes is the heap that is not
MLX arrays: compiled traces, Python's large objects, libraries' own allocations.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mlx_kto.runtime import torchless as _torchless  # noqa: E402

_torchless.keep_out()  # as the command does

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.runtime.heap import mallinfo  # noqa: E402

import mlx.core as mx  # noqa: E402


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key.lower() + "_mb"] = int(line.split()[1]) / 1024
    return out


def sample() -> dict:
    m = mallinfo()
    mb = 2**20
    s = _status()
    s.update(
        t=time.time(),
        mlx_active_mb=mx.get_active_memory() / mb,
        mlx_cache_mb=mx.get_cache_memory() / mb,
        heap_mb=m.arena / mb,
        heap_in_use_mb=m.uordblks / mb,
        heap_free_mb=m.fordblks / mb,
    )
    s["heap_not_mlx_mb"] = s["heap_in_use_mb"] - s["mlx_active_mb"] - s["mlx_cache_mb"]
    return s


def mappings(top: int = 8) -> list[tuple[str, float]]:
    """Resident MB per mapping name ([heap], [anon], each library) at this moment."""
    rss: collections.Counter = collections.Counter()
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                rss[name] += int(line.split()[1]) / 1024
    return [(n, round(v, 1)) for n, v in rss.most_common(top)]


def h2h_args(rows: int, epochs: int, out: Path) -> list[str]:
    """h2h.py's mlx-kto command line on its fixture (built under out)."""
    from h2h import mlx_train_args, parse_args
    from h2h_fixture import h2h_model, write_fixture

    model = h2h_model(out)
    data, _ = write_fixture(out, rows)
    args = parse_args(["--rows", str(rows), "--epochs", str(epochs), "--skip-trl"])
    return mlx_train_args(model, data, out / "run", out / "ref-cache", args)


def main() -> None:
    argv = sys.argv[1:]
    train_args = None
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    p.add_argument(
        "--extra", default="", help="more train flags for the h2h command, e.g. '--no-compile'"
    )
    p.add_argument("--series", type=float, default=0.0, help="also print a sample every S seconds")
    a = p.parse_args(argv)
    if not sys.platform.startswith("linux") or mallinfo() is None:
        sys.exit("rss_probe: Linux only (reads /proc and glibc's mallinfo2)")
    from mlx_kto.cli.app import run as run_cli
    from mlx_kto.cli.train import train_command

    with tempfile.TemporaryDirectory(prefix="mlx_kto_rss_") as tmp:
        if train_args is None:
            train_args = h2h_args(a.rows, a.epochs, Path(tmp)) + a.extra.split()
        samples, done, at_peak = [], threading.Event(), {"rss": 0.0, "maps": []}

        def run():
            while not done.is_set():
                s = sample()
                samples.append(s)
                if s["vmrss_mb"] > at_peak["rss"] + 4:  # a new high: what is resident now
                    at_peak.update(rss=s["vmrss_mb"], maps=mappings())
                time.sleep(a.every)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        try:
            run_cli(train_command, train_args, "python -m mlx_kto.train")
        except SystemExit as e:
            if e.code:
                raise
        finally:
            done.set()
            th.join()
        t0 = samples[0]["t"]
        if a.series > 0:
            next_t = t0
            for s in samples:
                if s["t"] >= next_t:
                    rec = {k: round(v, 1) for k, v in s.items() if k != "t"}
                    print(
                        json.dumps(
                            {
                                "bench": "rss_probe",
                                "at": "series",
                                "t_s": round(s["t"] - t0, 1),
                                **rec,
                            }
                        )
                    )
                    next_t = s["t"] + a.series
        for what, key in (("rss_peak", "vmrss_mb"), ("mlx_active_peak", "mlx_active_mb")):
            s = max(samples, key=lambda s: s[key])
            rec = {k: round(v, 1) for k, v in s.items() if k != "t"}
            print(
                json.dumps({"bench": "rss_probe", "at": what, "t_s": round(s["t"] - t0, 1), **rec})
            )
        print(json.dumps({"bench": "rss_probe", "at": "rss_peak", "mappings_mb": at_peak["maps"]}))


if __name__ == "__main__":
    main()
