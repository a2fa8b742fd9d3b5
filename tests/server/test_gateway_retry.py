"""The fleet gateway sends a Fleet call again when the SuperLink fails it with 5xx, only where a
second call is safe, and within its time budget (an in-process gateway over a mock SuperLink)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from starlette.testclient import TestClient

import server.gateway as gateway
from server.gateway import RETRIED, Upstream, create_app

PATHS = frozenset({"/v1/fleet/push-object", "/v1/fleet/push-messages",
                   "/v1/fleet/register-node"})


def gateway_over(answers: Callable[[int], int]) -> tuple[TestClient, list[str]]:
    """A gateway whose SuperLink answers the n-th call (from 0) with ``answers(n)``; the paths
    the SuperLink saw."""
    seen: list[str] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(answers(len(seen) - 1), content=b"{}")

    app = create_app(Upstream("127.0.0.1", 1, None), allowed=PATHS,
                     transport=httpx.MockTransport(superlink))
    return TestClient(app), seen


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "RETRY_DELAYS_S", (0.01, 0.01, 0.01, 0.01))


@pytest.mark.parametrize("path", ["/v1/fleet/push-object", "/v1/fleet/push-messages"])
def test_a_sites_push_the_superlink_failed_twice_gets_through(path: str):
    client, seen = gateway_over(lambda n: 500 if n < 2 else 200)
    with client:
        answer = client.post(path, content=b"reply")
    assert answer.status_code == 200
    assert seen == [path] * 3


def test_a_call_that_keeps_failing_is_answered_with_the_superlinks_error():
    client, seen = gateway_over(lambda n: 500)
    with client:
        answer = client.post("/v1/fleet/push-messages", content=b"reply")
    assert answer.status_code == 500
    assert len(seen) == 1 + len(gateway.RETRY_DELAYS_S)


def test_registering_a_node_is_not_sent_twice():
    assert "/v1/fleet/register-node" not in RETRIED
    client, seen = gateway_over(lambda n: 500)
    with client:
        answer = client.post("/v1/fleet/register-node", content=b"key")
    assert answer.status_code == 500 and len(seen) == 1


def test_no_attempt_starts_after_the_budget(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gateway, "RETRY_DELAYS_S", (0.01, 5.0))
    monkeypatch.setattr(gateway, "RETRY_BUDGET_S", 1.0)
    client, seen = gateway_over(lambda n: 503)
    with client:
        answer = client.post("/v1/fleet/push-object", content=b"object")
    assert answer.status_code == 503 and len(seen) == 2


def test_forwarded_calls_are_counted_into_one_summary_line_and_refusals_logged_one_each(
        caplog: pytest.LogCaptureFixture):
    counter = gateway.Counter()

    def superlink(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"{}")

    app = create_app(Upstream("127.0.0.1", 1, None), allowed=PATHS, counter=counter,
                     transport=httpx.MockTransport(superlink), summary_s=3600)
    with caplog.at_level("INFO", logger="myelofed.gateway"), TestClient(app) as client:
        for _ in range(5):
            client.post("/v1/fleet/push-messages", content=b"r")
        client.post("/v1/fleet/push-object", content=b"o")
        client.post("/v1/control/start-run", content=b"x")  # refused: logged on its own
        assert counter.counts == {("push-messages", 200): 5, ("push-object", 200): 1}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("refused POST /v1/control/start-run" in line for line in lines) == 1
    # at shutdown the counts are logged as one line, then reset
    assert "forwarded 6 request(s) (push-messages 200: 5, push-object 200: 1)" in lines
    assert len(lines) == 2 and counter.summary() is None
