"""One thread for all of a chat's MLX work: loading the model and adapter, generating.

MLX streams belong to the thread that created them (mlx >= 0.31): an array built
lazily on one thread (e.g. adapter weights loaded on the main thread) cannot be
evaluated on another ("There is no Stream(cpu, 0) in current thread"). So a chat
does every MLX call on one `MLXThread`; the terminal UI and the web server only
receive text pieces from it, and ask it to stop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

Emit = Callable[[str, Any], None]  # ("piece", text) | ("end", None) | ("error", exception)


class StopFlag:
    """A request to stop a reply, safe to set from a signal handler: `set` takes no lock.
    (`threading.Event.set` takes its Condition's lock; a second Ctrl-C landing inside the
    first one's `set` ran the handler again on the same thread, which then waited for that
    lock forever.) Polled with `is_set`; nothing waits on it."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True  # one store: atomic under the GIL, and re-entrant

    def is_set(self) -> bool:
        return self._set


class MLXThread:
    """A single daemon worker thread; calls and streams run on it one after another.
    (Daemon: Ctrl-C while a model loads exits at once instead of waiting for the load.)"""

    def __init__(self, name: str = "mlx-kto-mlx"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:  # for the life of the process (see `finish`)
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, who re-raises it
                future.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `fn` on the MLX thread and return its result (its exception re-raised here)."""
        return self.submit(lambda: fn(*args, **kwargs)).result()

    def start_stream(
        self, pieces: Callable[[], Iterable[str]], stop: StopFlag, emit: Emit
    ) -> Future:
        """Iterate `pieces()` on the MLX thread, handing each piece to `emit` (called on
        the MLX thread; it must only hand off, e.g. put on a queue). Stops before the
        next piece once `stop` is set; always ends with one "end" or "error" event."""

        def work() -> None:
            try:
                for piece in pieces():
                    if stop.is_set():
                        break
                    emit("piece", piece)
            except Exception as e:  # reported to the UI as one line, not a traceback
                emit("error", e)
            else:
                emit("end", None)

        return self.submit(work)

    def stream(
        self, pieces: Callable[[], Iterable[str]], stop: StopFlag, poll: float = 0.1
    ) -> Iterator[str]:
        """`start_stream` for a blocking caller: yields the pieces on the calling thread
        and returns when the reply ends or once `stop` is set (without waiting for the
        MLX thread to finish its current token); re-raises the worker's error."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.start_stream(pieces, stop, lambda kind, value: q.put((kind, value)))
        while not stop.is_set():
            try:
                kind, value = q.get(timeout=poll)  # short waits: notice `stop` promptly
            except queue.Empty:
                continue
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def finish(self, timeout: float | None = 30) -> None:
        """Wait until the jobs queued so far are done (up to `timeout`); call before the
        process exits. The thread itself is never ended: with mlx 0.32 a process aborts
        at exit ("terminate called without an active exception") when a thread that
        loaded and ran the model has ended first, or ends while the interpreter does;
        an idle daemon thread is safe."""
        try:
            self.submit(lambda: None).result(timeout)
        except TimeoutError:
            pass
