"""Keep Ctrl-C a ``KeyboardInterrupt`` around calls that take SIGINT for themselves.

Ray Train V2's ``TorchTrainer.fit()``, called from the main thread, replaces the process's SIGINT handler (for
good) with one that asks its controller to abort and then calls ``sys.exit``: Ctrl-C would end ``cap-dist
finetune`` / ``run`` (and the demo) silently with status 1, with no one line saying what was kept. From another
thread it registers nothing. So such a call runs in a helper thread while the main thread waits in short joins,
where Ctrl-C (and the CLI's SIGTERM) arrive as exceptions; the caller's cleanup (its Ray shutdown, which ends the
training run's actors) then runs as for any interrupt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_in_thread(name: str, fn: Callable[..., T], *args: Any, tick: Callable[[], None] | None = None,
                   **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread named ``name``; returns its result or raises its error as it
    is. ``tick`` runs about once a second while it works (a progress display). Called from a thread other than
    the main one (where signals never arrive), it simply calls ``fn``."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = err

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=1.0)              # short waits: Ctrl-C reaches this thread between them
        if tick is not None:
            tick()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
