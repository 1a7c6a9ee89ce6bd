"""The Router's view of a cluster, as components: backends of several nodes in one table, a node
suspended and lost, prefix affinity with bounded load, and the models of several Registries merged.

The user-visible promises (routing across nodes, node loss under load) are proven through Envoy
in tests/cluster/; these tests pin the decisions behind them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import pytest
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2
from lmcluster.router.v1 import openai_pb2 as pb
from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2

from services.router.affinity import prefix_key
from services.router.catalog import ModelCatalog
from services.router.errors import BackendUnavailable
from services.router.routing import RoutingTable


def backend(backend_id: str, model_id: str, host: str, slots: int = 4) -> supervisor_pb2.Backend:
    return supervisor_pb2.Backend(
        id=backend_id, model_id=model_id, endpoint=f"http://{host}:8100", state=supervisor_pb2.BACKEND_STATE_READY,
        slots=supervisor_pb2.Slots(total=slots),
    )  # fmt: skip


def snapshot(*backends: supervisor_pb2.Backend) -> supervisor_service_pb2.WatchBackendsResponse:
    return supervisor_service_pb2.WatchBackendsResponse(
        revision=1, snapshot=supervisor_service_pb2.BackendSnapshot(backends=list(backends))
    )


def new_table(load_factor: float = 1.25) -> RoutingTable:
    return RoutingTable(
        queue_limit=8, queue_timeout=5.0, overflow_queue_threshold=0, retry_after=2, load_factor=load_factor
    )


def two_node_table(replicas_per_node: int = 1, load_factor: float = 1.25) -> RoutingTable:
    """Both nodes run backends with the same ids and ports, as two Supervisors on two hosts do."""
    table = new_table(load_factor)
    for host in ("127.0.0.2", "127.0.0.3"):
        backends = [backend(f"m#{i}@8100", "m", f"{host}-{i}") for i in range(replicas_per_node)]
        table.apply(snapshot(*backends), node=host)
    return table


def chat(*contents: str) -> pb.CreateChatCompletionRequest:
    request = pb.CreateChatCompletionRequest(model="m")
    for index, content in enumerate(contents):
        message = request.messages.add(role="system" if index == 0 and len(contents) > 1 else "user")
        message.content.string_value = content
    return request


async def test_same_backend_ids_on_two_nodes_are_two_backends() -> None:
    table = two_node_table()
    async with table.lease(("m",)) as first, table.lease(("m",)) as second:
        assert {first.load.node, second.load.node} == {"127.0.0.2", "127.0.0.3"}
        assert first.load.key != second.load.key


async def test_a_node_snapshot_replaces_only_that_node() -> None:
    table = two_node_table()
    table.apply(snapshot(), node="127.0.0.2")  # node A now runs nothing
    assert [load.node for load in table.backends_of("m")] == ["127.0.0.3"]


async def test_a_suspended_node_gets_no_request_and_its_snapshot_brings_it_back() -> None:
    table = two_node_table()
    table.suspend("127.0.0.2")
    for _ in range(4):
        async with table.lease(("m",)) as lease:
            assert lease.load.node == "127.0.0.3"
    table.apply(snapshot(backend("m#0@8100", "m", "127.0.0.2-0")), node="127.0.0.2")
    nodes = set()
    async with table.lease(("m",)) as first, table.lease(("m",)) as second:
        nodes = {first.load.node, second.load.node}
    assert nodes == {"127.0.0.2", "127.0.0.3"}


async def test_a_lost_node_cuts_the_generations_running_on_it() -> None:
    table = two_node_table()
    started = asyncio.Event()

    async def generate_on_node_a() -> None:
        async with table.lease(("m",), exclude=frozenset({"127.0.0.3|m#0@8100"})) as lease:
            assert lease.load.node == "127.0.0.2"
            async with lease.unless_lost():
                started.set()
                await asyncio.sleep(30)  # a stream from a host that went silent

    running = asyncio.create_task(generate_on_node_a())
    await started.wait()
    table.forget("127.0.0.2")
    with pytest.raises(BackendUnavailable, match="was lost"):
        await asyncio.wait_for(running, 5)
    assert {load.node for load in table.backends_of("m")} == {"127.0.0.3"}


async def test_a_released_node_lets_its_running_generations_finish() -> None:
    table = two_node_table()
    async with table.lease(("m",), exclude=frozenset({"127.0.0.3|m#0@8100"})) as lease:
        async with lease.unless_lost():
            table.release("127.0.0.2")
            await asyncio.sleep(0.05)  # not cut
    assert {load.node for load in table.backends_of("m")} == {"127.0.0.3"}


async def test_every_router_sends_a_prefix_to_the_same_replica() -> None:
    # Two Routers (two tables) that never talk: the same shared prefix lands on the same replica.
    first, second = two_node_table(replicas_per_node=2), two_node_table(replicas_per_node=2)
    chosen: dict[str, set[str]] = collections.defaultdict(set)
    for document in range(20):
        for question in range(3):
            key = prefix_key(chat(f"Answer from this document #{document}.", f"question {question}"))
            for table in (first, second):
                async with table.lease(("m",), affinity=key) as lease:
                    chosen[key].add(lease.load.backend.endpoint)
    assert all(len(endpoints) == 1 for endpoints in chosen.values())
    # ... and the prefixes spread over all four replicas rather than piling on one.
    assert len({endpoint for endpoints in chosen.values() for endpoint in endpoints}) == 4


async def test_a_busy_preferred_replica_spills_within_the_load_bound() -> None:
    table = two_node_table(replicas_per_node=1, load_factor=1.25)
    key = prefix_key(chat("One long shared system prompt.", "q"))
    async with contextlib.AsyncExitStack() as held:
        leases = [await held.enter_async_context(table.lease(("m",), affinity=key)) for _ in range(3)]
        nodes = [lease.load.node for lease in leases]
    # The first two share the preferred replica (its bound is ceil(1.25 * 2 / 2) = 2); the third spills.
    assert nodes[0] == nodes[1] != nodes[2]


def test_prefix_keys_follow_the_shared_part_of_the_prompt() -> None:
    system = "You answer from these documents: ..."
    assert prefix_key(chat(system, "What is A?")) == prefix_key(chat(system, "What is B?"))
    assert prefix_key(chat(system, "What is A?")) != prefix_key(chat(system + " (v2)", "What is A?"))
    assert prefix_key(chat("What is A?")) == prefix_key(chat("What is A?"))
    assert prefix_key(chat("What is A?")) != prefix_key(chat("What is B?"))
    document = "D" * 2000
    first = pb.CreateCompletionRequest(model="m")
    first.prompt.string_value = document + " question one"
    second = pb.CreateCompletionRequest(model="m")
    second.prompt.string_value = document + " question two"
    assert prefix_key(first) == prefix_key(second)


def test_catalog_merges_nodes_and_forgets_a_lost_one() -> None:
    catalog = ModelCatalog()

    def models(*pairs: tuple[str, int]) -> registry_service_pb2.WatchModelsResponse:
        return registry_service_pb2.WatchModelsResponse(
            revision=1,
            snapshot=registry_service_pb2.ModelSnapshot(
                models=[registry_pb2.Model(id=i, kind=registry_pb2.MODEL_KIND_LLM, state=state) for i, state in pairs]
            ),
        )

    ready, downloading = registry_pb2.MODEL_STATE_READY, registry_pb2.MODEL_STATE_DOWNLOADING
    catalog.apply(models(("shared", downloading), ("only-a", ready)), node="127.0.0.2")
    catalog.apply(models(("shared", ready), ("only-b", ready)), node="127.0.0.3")
    assert catalog.resolve("shared").variant_ids == ("shared",)  # READY on B is enough
    assert catalog.nodes_with("shared") == ["127.0.0.3"]
    assert catalog.nodes_with("only-a") == ["127.0.0.2"]
    catalog.forget("127.0.0.2")
    assert {card.id for card in catalog.list_models().data} == {"shared", "only-b"}
