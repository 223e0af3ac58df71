"""One tokenizer per thread of the front.

A fast (Rust) tokenizer must not be used by two threads at once ("Already borrowed" errors), so
the front used to share one behind a lock: the task threads tokenising prompts and the receiver
thread detokenising every finished request took turns. Under a low flood the lock was rarely
free: the receiver, the one thread that resolves every request, waited 50-150 ms for it behind
the task threads' prompts, and a high job's prompt waited behind the low ones (W-priority's
slowest high jobs spent that long between their last step and their result).

A copy per thread needs no lock. A copy is not free: for a vocabulary of 128k tokens one took
~0.5 s to make and ~34 MB on the dev CPU, once per thread that tokenises (the task threads,
the receiver). So the receiver makes its copy when it starts, and `prepare` makes the task
threads' copies ahead, in the background, for the threads to take on their first call.
"""

from __future__ import annotations

import copy
import threading
from typing import Any


class ThreadTokenizers:
    """`get()`: this thread's own copy of `tokenizer`, taken from the copies made ahead
    (`prepare`) or made on its first call."""

    def __init__(self, tokenizer: Any) -> None:
        self.template = tokenizer  # copied, never used to tokenise
        self._local = threading.local()
        # Guards the spare copies, and copying: the template is read by one copy at a time.
        self._lock = threading.Lock()
        self._spares: list[Any] = []
        self.copies = 0

    def get(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._lock:
                tokenizer = self._spares.pop() if self._spares else self._copy()
            self._local.tokenizer = tokenizer
        return tokenizer

    def prepare(self, count: int) -> threading.Thread:
        """Make `count` copies ahead in a background thread, for threads that have not asked
        yet; returns the thread."""

        def make() -> None:
            for _ in range(count):
                with self._lock:
                    self._spares.append(self._copy())

        thread = threading.Thread(target=make, name="tideq-tokenizers", daemon=True)
        thread.start()
        return thread

    def _copy(self) -> Any:  # under the lock
        self.copies += 1
        return copy.deepcopy(self.template)
