"""`diffgentor worker` started while a service is down waits for it; a misconfigured one still exits."""

from __future__ import annotations

from typing import Any

import pytest

from api_client import cli
from api_client.errors import ServiceUnreachable


class FlakyClient:
    def __init__(self, failures: int, *, transient: bool = True) -> None:
        self.failures = failures
        self.transient = transient
        self.calls = 0

    def check_database(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ServiceUnreachable(
                "the job database", "postgresql://db", "connection refused", transient=self.transient
            )

    def check_broker(self) -> None:
        pass

    artifacts: Any = None


def test_worker_waits_for_a_service_that_is_down(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", pauses.append)
    client = FlakyClient(failures=3)
    cli._wait_for_services(client)
    assert client.calls == 4 and pauses == [1.0, 2.0, 4.0]
    err = capsys.readouterr().err
    assert err.count("waiting for a service: cannot reach the job database") == 3


def test_worker_exits_on_a_misconfigured_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.time, "sleep", lambda _: pytest.fail("must not wait"))
    with pytest.raises(ServiceUnreachable):
        cli._wait_for_services(FlakyClient(failures=1, transient=False))
