"""Two inference nodes and a gateway with two Routers, under load through Envoy, with real faults.

The scenarios share one cluster and run in order; each leaves it healed for the next:
routing across nodes, a model only one node has, node A killed (every process of it) and back,
node A cut off (every process of it stopped) and back, a model upgrade rolled node by node, and one
of the two Routers killed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import secrets
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from services.router.settings import RouterSettings
from tests.chaos.faults import new_release
from tests.chaos.load import Load, chat_body
from tests.cluster.conftest import (
    NODE_A,
    NODE_B,
    ONLY_ON_B_MODEL_ID,
    Cluster,
    all_nodes_followed,
    router_gauge,
    wait_for,
)
from tests.fixtures.parts import process_table
from tests.fixtures.stack import DEMO_FILE, DEMO_MODEL_ID, DEMO_PUBLISHER, DEMO_REPO

pytestmark = pytest.mark.timeout(900)

COALESCE_STALL = RouterSettings.model_fields["coalesce_stall_seconds"].default


def ask(http: httpx.Client, model: str = DEMO_MODEL_ID) -> httpx.Response:
    """A question no one asked before (its own system prompt: its own prefix and cache scope)."""
    body = chat_body(model, f"You are terse. Cluster {secrets.token_hex(6)}.", "Name a colour.")
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"], response.text
    return response


def ask_many(cluster: Cluster, count: int, model: str = DEMO_MODEL_ID) -> None:
    with httpx.Client(base_url=cluster.http_url, timeout=300.0) as http:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: ask(http, model), range(count)))


def test_requests_are_spread_over_both_nodes(cluster: Cluster) -> None:
    before = {host: node.prompt_tokens() for host, node in cluster.nodes.items()}
    ask_many(cluster, 16)
    after = {host: node.prompt_tokens() for host, node in cluster.nodes.items()}
    assert all(after[host] > before[host] for host in before), (before, after)


def test_a_model_only_one_node_has_is_listed_and_served_from_it(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.http_url, timeout=300.0) as http:
        listed = {card["id"] for card in http.get("/v1/models").json()["data"]}
        assert ONLY_ON_B_MODEL_ID in listed
        before = cluster.nodes[NODE_B].prompt_tokens(ONLY_ON_B_MODEL_ID)
        answer = ask(http, ONLY_ON_B_MODEL_ID)
    assert answer.json()["model"] == ONLY_ON_B_MODEL_ID
    assert cluster.nodes[NODE_B].prompt_tokens(ONLY_ON_B_MODEL_ID) > before
    assert not cluster.nodes[NODE_A].ready_backends(ONLY_ON_B_MODEL_ID)


def test_a_node_killed_under_load_fails_no_request_that_had_not_started(cluster: Cluster) -> None:
    node = cluster.nodes[NODE_A]
    with Load(cluster, DEMO_MODEL_ID) as load:  # type: ignore[arg-type]
        load.wait_for_successes(8, since=0.0)
        killed_at = time.monotonic()
        node.kill()
        wait_for(lambda: all_nodes_followed(cluster, count=1), "node A out of both Routers' tables", 60)
        load.wait_for_successes(12, since=time.monotonic())
    result = load.result
    assert result.requests > 20
    assert not result.failed_before_streaming(), result.describe()
    # Only streams already running on node A may break, with an error event.
    assert len(result.failed) <= len(result.in_flight_at(killed_at)), result.describe()
    assert all(o.started <= killed_at for o in result.failed), result.describe()


def test_a_node_that_comes_back_takes_traffic(cluster: Cluster) -> None:
    node = cluster.nodes[NODE_A]
    node.start()
    wait_for(lambda: all_nodes_followed(cluster), "node A followed again by both Routers", 60)
    before = node.prompt_tokens()
    for _ in range(6):
        ask_many(cluster, 8)
        if node.prompt_tokens() > before:
            break
    assert node.prompt_tokens() > before


def test_a_node_cut_off_under_load_is_given_up_then_followed_again(cluster: Cluster) -> None:
    """SIGSTOP of every process of node A: its sockets stay open and nothing answers, as with a
    hung host or a lost link. Keepalive pings find it; streams hanging on it are cut, not left.

    Only answers that had begun on node A fail. A request that came after the cut fails only if
    it joined an identical stream of node A (coalescing) before that stream had been silent for
    the stall time; later ones start their own generation."""
    node = cluster.nodes[NODE_A]
    with Load(cluster, DEMO_MODEL_ID) as load:  # type: ignore[arg-type]
        load.wait_for_successes(8, since=0.0)
        node.signal_all(signal.SIGSTOP)
        cut_at = time.monotonic()
        try:
            wait_for(lambda: all_nodes_followed(cluster, count=1), "node A given up by both Routers", 60)
            load.wait_for_successes(12, since=time.monotonic())
        finally:
            node.signal_all(signal.SIGCONT)
        wait_for(lambda: all_nodes_followed(cluster), "node A followed again", 60)
        load.wait_for_successes(6, since=time.monotonic())
    result = load.result
    assert not result.failed_before_streaming(), result.describe()
    assert all(o.started <= cut_at + COALESCE_STALL for o in result.failed), result.describe()


def header_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.sha256(file.read(1 << 20)).hexdigest()


def test_a_model_upgrade_rolled_node_by_node_loses_no_request(cluster: Cluster, tmp_path: Path) -> None:
    with Load(cluster, DEMO_MODEL_ID) as load:  # type: ignore[arg-type]
        load.wait_for_successes(6, since=0.0)
        for host, context_length in ((NODE_A, 4096), (NODE_B, 4096)):
            node = cluster.nodes[host]
            target = node.models_dir / DEMO_PUBLISHER / DEMO_REPO / DEMO_FILE
            fresh = new_release(target, tmp_path / f"release-{host}.gguf", context_length=context_length)
            header = header_sha256(fresh)
            staged = target.with_name(".download.part")
            shutil.move(fresh, staged)
            os.replace(staged, target)

            def switched() -> bool:
                ready = node.ready_backends(DEMO_MODEL_ID)
                return bool(ready) and all(b.model_fingerprint == header for b in ready)  # noqa: B023

            wait_for(switched, f"node {host} serving the new release")
            load.wait_for_successes(4, since=time.monotonic())
    result = load.result
    assert not result.failed, result.describe()


def router_pid(cluster: Cluster, port: int) -> int:
    """The Router process (below the gateway's launcher) that listens on `port`."""
    launcher = cluster.gateway.process.pid
    for pid, info in process_table().items():
        if info.ppid != launcher:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"router" in argv and f"LMC_ROUTER_PORT={port}".encode() in environ:
            return pid
    raise AssertionError(f"no Router on port {port} below the gateway {launcher}")


def test_one_of_two_routers_killed_under_load_costs_only_streams_running_through_it(cluster: Cluster) -> None:
    victim = router_pid(cluster, cluster.router_ports[1])
    with Load(cluster, DEMO_MODEL_ID) as load:  # type: ignore[arg-type]
        load.wait_for_successes(6, since=0.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        load.wait_for_successes(12, since=killed_at)
    result = load.result
    # Envoy sends the others again, to the other Router.
    assert not result.failed_before_streaming(), result.describe()
    assert all(o.started <= killed_at for o in result.failed), result.describe()
    # The launcher restarts it, and it follows both nodes again.
    wait_for(lambda: router_pid(cluster, cluster.router_ports[1]) != victim, "the Router restarted", 60)
    wait_for(lambda: router_gauge(cluster.router_metrics[1], "lmc_router_nodes", state="reachable") == 2,
             "the restarted Router following both nodes", 60)  # fmt: skip
