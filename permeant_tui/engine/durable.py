"""The workspace's flusher: one thread that makes snapshot saves durable after the worker has
written them, so a turn never waits for the disk.

A save (snapshot.write_snapshot with a flusher) writes its new blocks and its manifest to temp
files on the worker thread, which takes a few milliseconds: the bytes go to the page cache. The
flusher then fsyncs and renames them in the order crash safety needs (blocks, their folder,
then the manifest: `PendingSave.commit`), one save at a time, in the order they were made.
After the last pending save it collects the blocks no manifest names.

What "saved" means: the transcript line of a turn is durable before the turn counts as done
(engine/workspace.py, unchanged). Its snapshot is durable tens of milliseconds later. A crash
in between leaves the previous snapshot, which the next start attaches and brings up to date
by prefilling only the turns after it. Nothing is attached unverified, in either case.

Every worker operation that reads or moves snapshot files (a restore from disk, reset, rename,
remove, import, an explicit save, shutdown) first calls `wait()`. A failed commit (a full disk)
is reported through `on_failed` and kept in `failed` until the worker takes it, which marks
the agent dirty again so the next save rewrites it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .snapshot import PendingSave


class Flusher:
    def __init__(self, collect: Callable[[], object] | None = None,
                 on_failed: Callable[[str, BaseException], None] | None = None) -> None:
        """`collect`: run after the last pending save commits (block collection), under `lock`.
        `on_failed(agent_id, exc)`: called on the flusher's thread when a commit fails."""
        self._collect, self._on_failed = collect, on_failed
        self._queue: deque[PendingSave] = deque()
        self._cond = threading.Condition()
        self._busy: PendingSave | None = None  # the save being landed
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failed: dict[str, BaseException] = {}
        # Held by a save from its first block check to its submit, and by block collection:
        # a block a save decided to reuse is never collected before the save is queued.
        self.lock = threading.RLock()

    def submit(self, pending: PendingSave) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the workspace's flusher is closed")
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="permeant-flusher",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self, agent_id: str | None = None) -> int:
        """Saves not yet durable (of `agent_id`, or all)."""
        with self._cond:
            saves = [*self._queue, *([self._busy] if self._busy is not None else [])]
            return sum(1 for p in saves if agent_id is None or p.agent_id == agent_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Until every submitted save is durable or failed. False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._busy is None, timeout)

    def take_failed(self) -> dict[str, BaseException]:
        """The agents whose last commits failed since the last call, with the errors."""
        with self._cond:
            failed, self._failed = self._failed, {}
            return failed

    def close(self, timeout: float | None = None) -> None:
        """Wait for the pending saves, then stop the thread."""
        self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                pending = self._queue.popleft()
                self._busy = pending
            failed: BaseException | None = None
            try:
                pending.commit()
            except BaseException as exc:  # noqa: BLE001 - reported, and the agent saved again
                failed = exc
            if failed is not None:
                with self._cond:
                    self._failed[pending.agent_id] = failed
                if self._on_failed is not None:
                    try:
                        self._on_failed(pending.agent_id, failed)
                    except Exception:  # noqa: BLE001 - a broken reporter must not stop the flusher
                        pass
            if self._collect is not None:
                with self.lock:
                    last = not self._queue  # nothing queued, none being made: the lock is held
                    if last:
                        try:
                            self._collect()
                        except Exception:  # noqa: BLE001 - collection is retried after the next save
                            pass
            with self._cond:
                self._busy = None
                self._cond.notify_all()
