"""Starting and stopping the long-running loops (producer, consumer): signals and asyncio."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Callable


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
