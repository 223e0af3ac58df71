"""One tokenizer per thread of the front.

A fast (Rust) tokenizer must not be used by two threads at once ("Already borrowed" errors), so
the front used to share one behind a lock: the task threads tokenising prompts and the receiver
thread detokenising every finished request took turns. Under a low flood the lock was rarely
free: the receiver, the one thread that resolves every request, waited 50-150 ms for it behind
the task threads' prompts, and a high job's prompt waited behind the low ones (W-priority's
slowest high jobs spent that long between their last step and their result).

A copy per thread needs no lock. Each copy costs the tokenizer's memory once per thread that
tokenises (the task threads, the receiver): a few MB, tens for a vocabulary of 128k tokens.
"""

from __future__ import annotations

import copy
import threading
from typing import Any


class ThreadTokenizers:
    """`get()`: this thread's own copy of `tokenizer`, made on its first call."""

    def __init__(self, tokenizer: Any) -> None:
        self.template = tokenizer  # copied, never used to tokenise
        self._local = threading.local()
        self._copying = threading.Lock()
        self.copies = 0

    def get(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._copying:  # the template is read by one copy at a time
                tokenizer = copy.deepcopy(self.template)
                self.copies += 1
            self._local.tokenizer = tokenizer
        return tokenizer
