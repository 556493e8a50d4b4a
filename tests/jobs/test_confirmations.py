"""[issue 13] worker.confirmations: single submits' pending-publish rows deleted in rounds."""

from __future__ import annotations

import threading
import time

import pytest

from worker.confirmations import PublishConfirmations


class RecordingDelete:
    """A delete that records its rounds; ``fail`` rounds raise first, ``gate`` holds a round."""

    def __init__(self, fail: int = 0) -> None:
        self.rounds: list[list[str]] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, ids: list[str]) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database unreachable")
        self.rounds.append(list(ids))


def test_ids_handed_over_during_a_round_go_out_together_in_the_next() -> None:
    delete = RecordingDelete()
    confirmations = PublishConfirmations(delete, linger_seconds=0.0)
    delete.gate.clear()
    confirmations.add(["a"])
    assert delete.entered.wait(10)  # the first round is in flight with ["a"]
    for job_id in "bcdef":
        confirmations.add([job_id])
    delete.gate.set()
    assert confirmations.flush(10)
    assert delete.rounds == [["a"], ["b", "c", "d", "e", "f"]]
    confirmations.close()


def test_a_failed_round_keeps_its_ids_for_the_next(caplog: pytest.LogCaptureFixture) -> None:
    """The database down for a while: the ids wait (one log line per back-off step), then go."""
    delete = RecordingDelete(fail=1)
    confirmations = PublishConfirmations(delete, linger_seconds=0.0)
    confirmations.add(["a", "b"])
    assert confirmations.flush(10)  # the retry comes after the 1 s back-off
    assert delete.rounds == [["a", "b"]]
    assert any("deleting pending-publish rows failed" in r.getMessage() for r in caplog.records)
    confirmations.close()


def test_past_the_cap_the_oldest_ids_are_given_up() -> None:
    """While the database is down the held ids are bounded; the dropped ones are only published
    again by the sweeper (their pending rows stay), which the claim makes harmless."""
    delete = RecordingDelete(fail=1)
    confirmations = PublishConfirmations(delete, linger_seconds=0.0, max_held=3)
    delete.gate.clear()
    confirmations.add(["a", "b"])
    assert delete.entered.wait(10)
    confirmations.add(["c", "d", "e"])
    delete.gate.set()
    assert confirmations.flush(10)
    assert delete.rounds == [["c", "d", "e"]]
    confirmations.close()


def test_flush_without_ids_returns_at_once_and_close_stops_the_thread() -> None:
    delete = RecordingDelete()
    confirmations = PublishConfirmations(delete)
    started = time.monotonic()
    assert confirmations.flush(10) and time.monotonic() - started < 1
    confirmations.add(["a"])
    confirmations.close()
    assert delete.rounds == [["a"]] and confirmations._thread is None
    confirmations.add(["b"])  # after close: deleted at once, on the caller's thread
    assert delete.rounds == [["a"], ["b"]]


def test_an_idle_thread_ends_and_the_next_id_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread does not outlive its work (it would keep the store it deletes for alive)."""
    import worker.confirmations

    monkeypatch.setattr(worker.confirmations, "IDLE_EXIT_SECONDS", 0.05)
    delete = RecordingDelete()
    confirmations = PublishConfirmations(delete, linger_seconds=0.0)
    confirmations.add(["a"])
    first = confirmations._thread
    assert first is not None and confirmations.flush(10)
    first.join(10)
    assert not first.is_alive() and confirmations._thread is None
    confirmations.add(["b"])
    assert confirmations.flush(10) and delete.rounds == [["a"], ["b"]]
    confirmations.close()
