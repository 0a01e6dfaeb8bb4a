"""The server's model lock: waiting questions go before waiting ingest."""

from __future__ import annotations

import threading
import time

import pytest

from hermes_policy.serving.model_lock import INGEST, QUESTION, ModelLock


def waiter(lock: ModelLock, priority: str, order: list[str]) -> threading.Thread:
    def run() -> None:
        with lock.hold(priority):
            order.append(priority)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_waiting_question_goes_before_ingest_that_waited_longer():
    lock, order = ModelLock(), []
    with lock.hold(INGEST):
        ingest = waiter(lock, INGEST, order)
        time.sleep(0.1)  # the ingest thread waits first
        question = waiter(lock, QUESTION, order)
        time.sleep(0.1)
    ingest.join(5)
    question.join(5)
    assert order == [QUESTION, INGEST]


def test_one_holder_at_a_time_and_the_wait_is_measured():
    lock, inside, most = ModelLock(), [0], [0]

    def work(priority: str) -> None:
        for _ in range(50):
            with lock.hold(priority):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(p,)) for p in (INGEST, INGEST, QUESTION, QUESTION)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most[0] == 1

    with lock.hold(QUESTION):
        pass
    assert 0 <= lock.last_wait < 0.05
    held = threading.Event()

    def hold_a_while() -> None:
        with lock.hold(INGEST):
            held.set()
            time.sleep(0.2)

    holder = threading.Thread(target=hold_a_while)
    holder.start()
    held.wait(5)
    with lock.hold(QUESTION):
        assert lock.last_wait >= 0.1
    holder.join()


def test_an_unknown_priority_is_refused():
    with pytest.raises(ValueError, match="priority"), ModelLock().hold("urgent"):
        pass
