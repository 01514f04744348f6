"""Compiled functions whose traces stay within a heap budget.

`mx.compile` keeps one trace per input signature (shapes, dtypes, constants, default stream)
for as long as the compiled function lives, and drops none. A trace holds the whole simplified
graph: on SmolLM2-135M with LoRA on every linear a gradient pass's is ~18 MB of heap, a
forward's 5-9 MB; on the h2h fixture 4.5 and 1.5-5 MB (bench/RESULTS.md). Packed micro-batches
of real feedback bring new shapes nearly every step, so the heap of a run grew by ~13 MB a
step on the fixture and without bound on longer runs.

`bounded(make)` keys a compiled function per (fastops mode, default stream, input signature),
each its own `make()` (a new function object, so its own MLX cache entry), and keeps the most
recently used within a budget of heap per function: each trace's size is measured as the
heap it added while tracing (glibc's mallinfo2; where that cannot be read, every trace counts
as an eighth of the budget). A dropped one is freed and MLX erases its trace with it
(`PyCompiledFun`'s destructor). The mode is part of the key because a trace keeps the ops it
was traced with (runtime/fastops.py `fast_ops`). A signature that comes back after being
dropped is traced again (~10% of a real step's time, bench/RESULTS.md), against a heap that
otherwise only grows. $MLX_KTO_TRACES sets the budget in MB (0 = MLX's own unbounded cache);
`scoped(mb)` sets it for what runs inside (a run with gradient checkpointing keeps less).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from mlx_kto.runtime import fastops, heap
from mlx_kto.runtime.switches import TRACES

import mlx.core as mx

BUDGET_MB = 128  # per compiled function: the fixture's gradient pass keeps ~28, SmolLM2's ~7
MIN_TRACE = 1 << 18  # a trace counts as at least 256 KB (measuring is noisy)
_scoped: list[int] = []  # budgets (MB) of the `scoped` contexts entered, innermost last


def signature(tree) -> Hashable:
    """What MLX retraces on: each array's shape and dtype, the structure of lists, tuples and
    dicts, and the values of everything else (Python scalars are constants of a trace)."""
    if isinstance(tree, mx.array):
        return (tree.shape, tree.dtype)
    if isinstance(tree, dict):
        return ("dict", tuple((k, signature(v)) for k, v in tree.items()))
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, tuple(signature(x) for x in tree))
    return tree


def budget_default() -> int:
    """The budget in bytes from $MLX_KTO_TRACES (MB; 0 = unbounded), else the innermost
    `scoped` one, else BUDGET_MB."""
    raw = TRACES.raw()
    if raw is not None:
        try:
            return max(0, int(float(raw) * (1 << 20)))
        except ValueError:
            pass
    return (_scoped[-1] if _scoped else BUDGET_MB) << 20


@contextmanager
def scoped(mb: int) -> Iterator[None]:
    """Inside, bounded functions made without a budget of their own keep `mb` MB of traces
    each ($MLX_KTO_TRACES still decides where it is set)."""
    _scoped.append(mb)
    try:
        yield
    finally:
        _scoped.pop()


class Bounded:
    """A compiled function that keeps its traces within `budget` bytes (0 = no bound): see
    the module docstring. `traced` counts the traces made, `dropped` those freed, `held` the
    bytes of those kept."""

    def __init__(self, make: Callable[[], Callable], budget: int | None = None):
        self.make = make
        self._budget = budget
        self.fns: OrderedDict[Hashable, tuple[Callable, int]] = OrderedDict()
        self.traced = 0
        self.dropped = 0
        self.held = 0

    @property
    def budget(self) -> int:
        """Bytes of traces kept: the one given, else `budget_default()` where it is called."""
        return budget_default() if self._budget is None else self._budget

    def key(self, args: tuple, kwargs: dict) -> Hashable:
        stream = repr(mx.default_stream(mx.default_device()))  # "Stream(Device(cpu, 0), 1)"
        return (fastops.active(), stream, signature(args), signature(kwargs))

    def __call__(self, *args, **kwargs):
        key = self.key(args, kwargs)
        kept = self.fns.get(key)
        if kept is not None:
            self.fns.move_to_end(key)
            return kept[0](*args, **kwargs)
        fn, budget = self.make(), self.budget
        before = heap.in_use()
        out = fn(*args, **kwargs)  # traces (lazily: nothing is computed yet)
        after = heap.in_use()
        if before is None or after is None:
            size = max(budget // 8, MIN_TRACE)
        else:
            size = max(after - before, MIN_TRACE)
        self.fns[key] = (fn, size)
        self.traced += 1
        self.held += size
        while budget and self.held > budget and len(self.fns) > 1:
            _, (_, freed) = self.fns.popitem(last=False)  # least recently used: MLX erases it
            self.held -= freed
            self.dropped += 1
        return out


def bounded(make: Callable[[], Callable], budget: int | None = None) -> Bounded:
    """`make()`'s compiled function, one per mode, stream and input signature, its traces
    kept within `budget` bytes (default: `budget_default()` at each call). `make` must build a
    new function object each call (MLX keys its trace cache by the Python function)."""
    return Bounded(make, budget)
