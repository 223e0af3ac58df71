"""Each thread of the front tokenises with its own tokenizer: no thread waits for another's
prompt, and no two threads use one tokenizer at once."""

from __future__ import annotations

import threading
import time
from typing import Any

from engine.request import Request, SamplingParams
from engine.tokenization import ThreadTokenizers
from tests.engine.test_engine_front import CharTokenizer, ScriptedBackend, make_engine

# Set while a prompt "hold" is being tokenised; cleared to let it finish. Module-level, so
# that every copy of HoldingTokenizer sees the same events.
HOLDING = threading.Event()
RELEASE = threading.Event()


class BorrowCheckedTokenizer(CharTokenizer):
    """Raises, as a fast tokenizer does ("Already borrowed"), when two threads use it at once."""

    def __init__(self) -> None:
        self.in_use = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.in_use:
            raise RuntimeError("Already borrowed")
        self.in_use = True
        try:
            time.sleep(0.001)
            return super().encode(text, add_special_tokens)
        finally:
            self.in_use = False


class HoldingTokenizer(CharTokenizer):
    """Tokenising the prompt "hold" takes until RELEASE is set."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text == "hold":
            HOLDING.set()
            RELEASE.wait(30)
        return super().encode(text, add_special_tokens)


def encode_from_threads(get: Any, threads: int = 8, calls: int = 20) -> list[str]:
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            for _ in range(calls):
                text = f"thread {i}"
                if get().encode(text) != [ord(c) for c in text]:
                    errors.append(f"thread {i}: wrong ids")
        except RuntimeError as err:
            errors.append(str(err))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def test_each_thread_gets_its_own_copy_made_once() -> None:
    shared = BorrowCheckedTokenizer()
    # The check is real: one tokenizer used by eight threads at once raises.
    assert encode_from_threads(lambda: shared)
    tokenizers = ThreadTokenizers(shared)
    assert encode_from_threads(tokenizers.get) == []
    assert tokenizers.copies == 8  # one a thread, kept for the thread's later calls
    mine = tokenizers.get()
    assert tokenizers.get() is mine and mine is not shared


def test_copies_made_ahead_are_taken_before_any_is_made_on_demand() -> None:
    tokenizers = ThreadTokenizers(BorrowCheckedTokenizer())
    tokenizers.prepare(3).join(10)
    assert tokenizers.copies == 3
    assert encode_from_threads(tokenizers.get, threads=3) == []
    assert tokenizers.copies == 3  # the three threads took the spares
    assert encode_from_threads(tokenizers.get, threads=2) == []
    assert tokenizers.copies == 5  # none left: two made on demand


def test_a_prompt_being_tokenised_holds_up_no_other_request() -> None:
    """While one thread is still tokenising a prompt, another request is tokenised, run,
    detokenised by the receiver thread and resolved."""
    backend = ScriptedBackend(script="abc")
    backend.tokenizer = HoldingTokenizer()
    engine = make_engine(backend)
    HOLDING.clear()
    RELEASE.clear()
    params = SamplingParams(max_tokens=3, temperature=0.0)
    held: dict[str, Any] = {}
    holder = threading.Thread(target=lambda: held.setdefault(
        "future", engine.submit(Request("held", prompt="hold", sampling=params))))
    try:
        holder.start()
        assert HOLDING.wait(10)
        done = engine.submit(Request("other", prompt="hi", sampling=params)).result(timeout=10)
        assert done.text == "abc" and holder.is_alive()  # the held prompt is still in encode
    finally:
        RELEASE.set()
        holder.join(10)
    assert held["future"].result(timeout=10).text == "abc"
    engine.shutdown()
