"""Parts of the stack killed or hung under load through Envoy: the rest keeps answering.

What each fault may cost, and what is asserted:
- Registry, Embedding, Cache, Redis killed; Redis or Embedding hung (SIGSTOP): nothing. The
  launcher restarts what died; meanwhile the Router routes from what it already knows, the cache
  degrades to exact lookups or to none (misses), and answers still come from the model.
- llama-server or the Supervisor (whose backends die with it) killed: only streams that were
  already sending tokens from the lost backend end with an error event; requests that had not
  started streaming wait for the restarted backend, and unary ones are generated again.
- The Router killed: only streams that were already sending tokens through it. Envoy sends every
  other request again (in flight on it, written to its closing connection, or finding no Router
  listening) until the restarted Router answers.
- Envoy killed: requests in flight on it, and requests sent while nothing listened on the public
  port (the client's connection refused or cut before an answer). The load's clients reconnect
  the way the openai SDK and gRPC's `wait_for_ready` do; what still failed is counted.
"""

from __future__ import annotations

import os
import secrets
import signal
import time

import httpx
import pytest

from tests.chaos import report
from tests.chaos.faults import part_healthy, part_pid, paused, wait_for
from tests.chaos.load import Load, LoadResult, chat_body
from tests.fixtures.stack import DEMO_MODEL_ID, Stack

# A scenario waits for a restart or a swap under load on a two-core machine: more than the default.
pytestmark = pytest.mark.timeout(900)

WARM_SUCCESSES = 6
AFTER_SUCCESSES = 8
PAUSE_SECONDS = 10.0

# Parts whose loss costs no request at all, and those whose loss may cut streams running on them.
LOSSLESS = ["registry", "embedding", "cache", "redis"]
CUTS_RUNNING_STREAMS = ["llama-server", "supervisor", "router"]


def run_fault(stack: Stack, part: str) -> tuple[LoadResult, float, float]:
    """SIGKILL of `part` under load; returns the load's result, the kill's moment and the heal time
    (the part answering its readiness probe again)."""
    with Load(stack, DEMO_MODEL_ID) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        victim = part_pid(stack, part)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        healthy = part_healthy(stack, part)
        heal = wait_for(lambda: part_pid(stack, part) != victim and healthy(), f"{part} back")
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
    return load.result, killed_at, heal


@pytest.mark.parametrize("part", LOSSLESS)
def test_a_killed_part_costs_no_request(chaos_stack: Stack, part: str) -> None:
    result, _killed_at, heal = run_fault(chaos_stack, part)
    report.record(f"SIGKILL {part}", result, heal)
    assert not result.failed, result.describe()


@pytest.mark.parametrize("part", CUTS_RUNNING_STREAMS)
def test_a_killed_backend_costs_only_streams_already_running_on_it(chaos_stack: Stack, part: str) -> None:
    result, killed_at, heal = run_fault(chaos_stack, part)
    report.record(f"SIGKILL {part}", result, heal, "only streams already sending tokens may fail")
    assert not result.failed_before_streaming(), result.describe()
    assert all(o.started <= killed_at for o in result.failed), result.describe()


def test_a_killed_envoy_costs_only_requests_it_held_or_could_not_take(chaos_stack: Stack) -> None:
    result, killed_at, heal = run_fault(chaos_stack, "envoy")
    back_at = killed_at + heal
    in_flight = result.in_flight_at(killed_at)
    while_down = [o for o in result.failed if killed_at <= o.started <= back_at]
    report.record(
        "SIGKILL envoy", result, heal,
        f"{len(in_flight)} in flight at the kill; {result.connect_retries} client reconnects",
    )  # fmt: skip
    assert all(o.started <= killed_at < o.ended or o in while_down for o in result.failed), result.describe()
    # Once Envoy is back, nothing fails.
    assert not [o for o in result.failed if o.started > back_at], result.describe()


@pytest.mark.parametrize("part", ["redis", "embedding"])
def test_a_hung_part_costs_no_request(chaos_stack: Stack, part: str) -> None:
    with Load(chaos_stack, DEMO_MODEL_ID) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        with paused(part_pid(chaos_stack, part)):
            during = time.monotonic()
            load.wait_for_successes(AFTER_SUCCESSES, since=during)
            time.sleep(max(0.0, PAUSE_SECONDS - (time.monotonic() - during)))
        heal = wait_for(part_healthy(chaos_stack, part), f"{part} answering")
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
    result = load.result
    report.record(f"SIGSTOP {part} {PAUSE_SECONDS:.0f} s", result, heal, "heal: after SIGCONT")
    assert not result.failed, result.describe()


def test_cached_answers_survive_a_redis_crash(chaos_stack: Stack) -> None:
    """Redis keeps its data (append-only file in the run folder): an answer cached before a
    SIGKILL of Redis is a hit after the launcher restarted it."""
    body = chat_body(DEMO_MODEL_ID, f"You are terse. Persistence {secrets.token_hex(4)}.", "Name a large ocean.")
    with httpx.Client(base_url=chaos_stack.http_url, timeout=120.0) as http:
        first = http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        assert first.headers["x-lmc-cache"] == "miss"
        wait_for(
            lambda: http.post("/v1/chat/completions", json=body).headers["x-lmc-cache"] == "hit", "the answer stored", 30
        )
        time.sleep(1.5)  # the append-only file is written to disk every second
        victim = part_pid(chaos_stack, "redis")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: part_pid(chaos_stack, "redis") != victim and part_healthy(chaos_stack, "redis")(), "Redis back")
        again = wait_for_response(http, body)
    assert again.headers["x-lmc-cache"] == "hit", again.headers
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]


def wait_for_response(http: httpx.Client, body: dict[str, object]) -> httpx.Response:
    """The first answer once the Cache reaches the restarted Redis again (until then: misses)."""
    last: list[httpx.Response] = []

    def hit() -> bool:
        response = http.post("/v1/chat/completions", json=body)
        last[:] = [response]
        return response.status_code == 200 and response.headers.get("x-lmc-cache") == "hit"

    wait_for(hit, "a cache hit after the Redis restart", 60)
    return last[0]
