"""Data parallel training over MLX's own distributed layer (`mx.distributed`).

`mlx.launch` starts one process per rank (ring backend over Ethernet/Thunderbolt, or the
others it offers) and `mx.distributed.init()` joins them; run alone, the group has one rank
and every function here is a no-op. Each rank reads its shard of every global batch
(`mlx_kto.train.step`); per optimizer step the ranks exchange three small messages:

1. the KL log-ratio sums of their micro-batches (so z is taken over every rank's rows),
2. their row-weighted gradient sums (one concatenated all_sum),
3. their metric sums (so the logged numbers are those of the global batch).

Only rank 0 writes adapters, checkpoints, metrics and logs. A rank that dies makes the
ring backend raise on the others ("connection to a peer was lost"), which `peer_lost`
turns into a one-line error; a rank that hangs (a sleeping laptop, a dead link that never
closes its socket) would block the others forever, so every wait on a collective runs
under a watchdog that ends the process with a message after `distributed_timeout` seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from mlx_kto.errors import UserError

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

# Metrics reduced across ranks: means over one side's rows (weighted by that side's count)
# and means over all rows (weighted by the row count); see loss.merge_metrics.
_SIDE_MEANS = {
    "rewards/chosen": "chosen",
    "logps/chosen": "chosen",
    "rewards/rejected": "rejected",
    "logps/rejected": "rejected",
}
_ROW_MEANS = ("loss", "kl", "rewards/accuracy")


@dataclass
class Dist:
    """This process's place in the run: `group` is None when it runs alone."""

    group: mx.distributed.Group | None = None
    rank: int = 0
    size: int = 1
    timeout: float = 0.0  # seconds a collective may wait (0 = forever)
    hint: str = ""  # what to do after a failure (train_loop: how to resume)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout: float = 0.0) -> Dist:
    """Join the ranks `mlx.launch` started (any backend it set up), or run alone."""
    group = mx.distributed.init()
    if group.size() == 1:
        return Dist(timeout=timeout)
    return Dist(group, group.rank(), group.size(), timeout)


class _Watchdog:
    """Ends the process when a collective waits longer than `timeout` seconds.

    MLX releases the GIL while it waits in `mx.eval`, so a plain daemon thread can watch."""

    def __init__(self):
        self._deadline: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _run(self):
        while True:
            time.sleep(0.5)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                sys.stderr.write(f"error: {what}\n")
                sys.stderr.flush()
                os._exit(3)

    @contextmanager
    def arm(self, timeout: float, what: str):
        if timeout <= 0:
            yield
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="mlx-kto-watch")
            self._thread.start()
        with self._lock:
            self._deadline, self._what = time.monotonic() + timeout, what
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None


_WATCHDOG = _Watchdog()


@contextmanager
def collective(dist: Dist, what: str):
    """Around an `mx.eval` that waits for the other ranks: a dead peer (the ring backend
    raises) or one silent for `dist.timeout` seconds ends the run with one line."""
    if dist.group is None:
        yield
        return
    hint = f"; {dist.hint}" if dist.hint else ""
    msg = (
        f"distributed: rank {dist.rank} waited more than {dist.timeout:g}s for the other "
        f"ranks ({what}); a rank hung or its machine went away{hint}"
    )
    with _WATCHDOG.arm(dist.timeout, msg):
        try:
            yield
        except RuntimeError as e:
            if "[ring]" in str(e) or "peer" in str(e) or "connection" in str(e):
                raise UserError(
                    f"distributed: rank {dist.rank} lost the connection to another rank "
                    f"({what}: {e}); the run stopped{hint}"
                ) from None
            raise


def all_sum(x: mx.array, dist: Dist) -> mx.array:
    """Sum over the ranks (lazy); x itself when alone."""
    if dist.group is None:
        return x
    return mx.distributed.all_sum(x, group=dist.group)


def sum_gradients(grad, dist: Dist):
    """Σ over ranks of a gradient tree, in one all_sum of the concatenated leaves
    (LoRA gradients are small: one message beats one per matrix). The caller has already
    weighted each rank's rows by 1 / (global rows), so the sum is the global mean."""
    if dist.group is None:
        return grad
    flat = tree_flatten(grad)
    if not flat:
        return grad
    dtype = flat[0][1].dtype
    sizes = [v.size for _, v in flat]
    vec = mx.concatenate([v.astype(dtype).reshape(-1) for _, v in flat])  # [Σ sizes]
    vec = mx.distributed.all_sum(vec, group=dist.group)
    offsets, out, o = [], [], 0
    for n in sizes:
        offsets.append(o)
        o += n
    for (k, v), o, n in zip(flat, offsets, sizes):
        out.append((k, vec[o : o + n].reshape(v.shape).astype(v.dtype)))
    return tree_unflatten(out)


def broadcast_from_main(tree, dist: Dist):
    """Rank 0's values on every rank (all_sum with zeros elsewhere: exact), so every rank
    starts from the same adapter and optimizer state whatever its seed or disk held."""
    if dist.group is None:
        return tree
    flat = tree_flatten(tree)
    out = [
        (k, mx.distributed.all_sum(v if dist.is_main else mx.zeros_like(v), group=dist.group))
        for k, v in flat
    ]
    return tree_unflatten(out)


def reduce_metrics(m: dict, ntoks: int, dist: Dist) -> tuple[dict, int]:
    """One step's metrics over every rank's rows, as if one process had run the global batch:

        count/*            summed
        side means         Σ_r count_r · value_r / Σ_r count_r     (rewards/*, logps/*)
        row means          Σ_r rows_r · value_r / Σ_r rows_r       (loss, kl, rewards/accuracy)
        rewards/margins    reduced rewards/chosen − reduced rewards/rejected
    Other keys keep this rank's value. `m` is this rank's merged floats ({} for no rows)."""
    if dist.group is None:
        return m, ntoks
    n_c, n_u = m.get("count/chosen", 0.0), m.get("count/rejected", 0.0)
    weights = {"chosen": n_c, "rejected": n_u}
    vals = [n_c, n_u, float(ntoks)]
    for k, side in _SIDE_MEANS.items():
        vals.append(weights[side] * m.get(k, 0.0) if k in m else 0.0)
    for k in _ROW_MEANS:
        vals.append((n_c + n_u) * m.get(k, 0.0))
    tot = all_sum(mx.array(vals, dtype=mx.float32), dist)
    with collective(dist, "reducing metrics"):
        tot = tot.tolist()
    g_c, g_u, g_tok = tot[0], tot[1], int(round(tot[2]))
    red = {"count/chosen": g_c, "count/rejected": g_u}
    i = 3
    for k, side in _SIDE_MEANS.items():
        w = g_c if side == "chosen" else g_u
        if w > 0:
            red[k] = tot[i] / w
        i += 1
    for k in _ROW_MEANS:
        if g_c + g_u > 0:
            red[k] = tot[i] / (g_c + g_u)
        i += 1
    if "rewards/chosen" in red and "rewards/rejected" in red:
        red["rewards/margins"] = red["rewards/chosen"] - red["rewards/rejected"]
    # kto_loss's key order first (as one process logs them), then this rank's other keys.
    order = (*_ROW_MEANS[:2], "rewards/chosen", "rewards/rejected", "rewards/margins")
    order += ("rewards/accuracy", "logps/chosen", "logps/rejected", "count/chosen")
    order += ("count/rejected",)
    out = {k: red[k] for k in order if k in red}
    out.update({k: v for k, v in m.items() if k not in red and k != "rewards/margins"})
    return out, g_tok


def check_same_step(step: int, dist: Dist) -> None:
    """Every rank must resume at the same step (they read the same checkpoint)."""
    if dist.group is None:
        return
    steps = all_sum(mx.array([step, step * step], dtype=mx.float32), dist)
    with collective(dist, "comparing resume steps"):
        s, s2 = steps.tolist()
    if abs(s - dist.size * step) > 0.5 or abs(s2 - dist.size * step * step) > 0.5:
        raise UserError(
            f"resume: the ranks found different checkpoints (this rank: step {step}); give every "
            "host the same run folder (a shared folder, or a copy of checkpoints/)"
        )


def _words(hex_digest: str, n: int = 8) -> list[int]:
    """The first n 16-bit words of a hex digest (exact in float32)."""
    return [int(hex_digest[4 * i : 4 * i + 4], 16) for i in range(n)]


def check_same_inputs(data_hash: str, n_rows: int, setup_hash: str, dist: Dist) -> None:
    """Every rank must train on the same rows with the same settings: each reads its shard of
    one global data order, so another file (or an edited copy, or other flags) on one host
    would train on a mix without a word. One gather of each rank's fingerprints; a mismatch
    is the same one-line UserError on every rank."""
    if dist.group is None:
        return
    mine = _words(data_hash) + _words(setup_hash) + [n_rows >> 16, n_rows & 0xFFFF]
    every = mx.distributed.all_gather(mx.array([mine], dtype=mx.float32), group=dist.group)
    with collective(dist, "comparing the training data"):
        table = [[int(v) for v in row] for row in every.tolist()]  # [ranks, 18]
    rows = [(r[16] << 16) | r[17] for r in table]
    other_data = [k for k, r in enumerate(table) if r[:8] != table[0][:8] or rows[k] != rows[0]]
    if other_data:
        which = ", ".join(f"rank {k}: {rows[k]} rows" for k in [0, *other_data])
        raise UserError(
            f"distributed: the ranks were given different training data ({which}; the same "
            "row count can hide other rows); give every rank the same --data (a shared "
            "folder, or an identical copy on each host)"
        )
    other_setup = [k for k, r in enumerate(table) if r[8:16] != table[0][8:16]]
    if other_setup:
        raise UserError(
            f"distributed: rank {other_setup[0]} was started with other training settings than "
            "rank 0 (loss, batch, learning rate, LoRA or model settings: resume.SETUP_FIELDS); "
            "start every rank with the same flags and config file"
        )
