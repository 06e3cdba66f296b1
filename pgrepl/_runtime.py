"""Running the long-lived loops (producer, consumer): the stop/wake signal, OS signals, asyncio."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import threading
from typing import Callable, Sequence


class Waker:
    """The one way to stop a loop and to wake it up: ``set()`` from any thread or signal handler.

    A loop that waits on sockets puts ``fileno()`` in its ``select``; a loop that only sleeps
    calls ``wait()``. Either returns as soon as ``set()`` is called (a self-pipe: safe in a
    signal handler, unlike locks).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._set = False

    @property
    def is_set(self) -> bool:
        """True once ``set()`` was called."""
        return self._set

    def set(self) -> None:
        """Ask the loop to stop; wakes any ``wait()`` or ``select`` on ``fileno()`` now."""
        self._set = True
        try:
            os.write(self._write, b"x")
        except OSError:  # pipe full (already woken) or closed
            pass

    def fileno(self) -> int:
        """The read end of the pipe, readable once ``set()`` was called."""
        return self._read

    def wait(self, timeout: float, fds: Sequence[int] = ()) -> Sequence[int]:
        """Sleep up to ``timeout`` seconds, less if ``set()`` is called or one of ``fds`` becomes
        readable; returns the readable ``fds``."""
        if self._set:
            return ()
        try:
            readable, _, _ = select.select([self._read, *fds], [], [], max(timeout, 0.0))
        except InterruptedError:
            return ()
        if self._read in readable:
            self._drain()
        return [fd for fd in readable if fd != self._read]

    def _drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass

    def close(self) -> None:
        """Release the pipe (the loop has ended)."""
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read = self._write = -1

    def __del__(self) -> None:
        if getattr(self, "_read", -1) >= 0:
            self.close()


def install_stop_handlers(stop: Callable[[], None], enabled: bool = True) -> Callable[[], None]:
    """Make SIGTERM and Ctrl-C call ``stop()``; returns the function that restores the old handlers.

    Only from the main thread (Python delivers signals there); elsewhere, or when not
    ``enabled`` (embedded in an application that owns its signals), nothing is installed.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.signal(signum, lambda *_: stop()) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


async def run_in_thread(target: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run a blocking loop in a worker thread; cancelling the awaiting task calls ``stop()`` and
    waits for the loop to finish cleanly before the cancellation propagates."""
    future = asyncio.get_running_loop().run_in_executor(None, target)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        stop()
        await future
        raise

