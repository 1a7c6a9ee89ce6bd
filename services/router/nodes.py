"""The inference nodes a Router follows, each a Registry and a Supervisor on one host.

`LMC_ROUTER_NODES` lists addresses and/or DNS names; a name may resolve to several nodes (a
Kubernetes headless Service) and is resolved again every `node_resolve_seconds`, so nodes that
come and go are followed. Each node's WatchModels and WatchBackends feed the one catalog and the
one routing table under the node's key (its address), so the request path stays free of RPCs.
Without `LMC_ROUTER_NODES` the Router follows the one Registry and Supervisor it is given, as on
one host.

A node whose Supervisor watch breaks is suspended at once (no new requests) and forgotten after
`node_lost_seconds` unless it is heard from again: its backends leave the table, streams still
running on them are cut, and its models are served by the nodes that also have them. Keepalive
pings find a node cut off without a reset (a hung host, a lost network) within seconds.
A node that leaves DNS (scaled in, replaced) drains: no new requests, what runs on it finishes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

import grpc
from lmcluster.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from lmcluster.supervisor.v1 import supervisor_service_pb2, supervisor_service_pb2_grpc

from services.router import metrics
from services.router.catalog import ModelCatalog
from services.router.follow import cancel_and_wait, follow_watch
from services.router.routing import RoutingTable
from services.router.settings import RouterSettings

log = logging.getLogger(__name__)


@dataclass
class Node:
    """One followed node: its channels, stubs and watch tasks."""

    key: str
    registry_channel: grpc.aio.Channel
    supervisor_channel: grpc.aio.Channel
    supervisor: supervisor_service_pb2_grpc.SupervisorServiceStub
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    lost_timer: asyncio.TimerHandle | None = None
    reachable: bool = False
    forgotten: bool = False
    models_heard: bool = False

    def unreachable(self) -> bool:
        """No Supervisor answers on this node's channel (it is down or cut off), as opposed to a refusal."""
        return self.supervisor_channel.get_state() != grpc.ChannelConnectivity.READY

    async def close(self) -> None:
        if self.lost_timer is not None:
            self.lost_timer.cancel()
        for task in self.watchers:
            await cancel_and_wait(task)
        await self.registry_channel.close()
        await self.supervisor_channel.close()


class NodeSet:
    def __init__(self, settings: RouterSettings, catalog: ModelCatalog, table: RoutingTable) -> None:
        self._settings = settings
        self._catalog = catalog
        self._table = table
        self.nodes: dict[str, Node] = {}
        self._resolver: asyncio.Task[None] | None = None
        # Names that resolved once keep their last addresses while DNS fails (a DNS blip is no node loss).
        self._resolved: dict[str, set[str]] = {}
        self._started = 0.0

    @property
    def clustered(self) -> bool:
        return bool(self._settings.nodes.strip())

    async def start(self) -> None:
        self._started = asyncio.get_running_loop().time()
        if not self.clustered:
            self._follow("", self._settings.registry_address, self._settings.supervisor_address)
            return
        await self._refresh()
        self._resolver = asyncio.create_task(self._keep_resolving(), name="node-resolver")

    async def close(self) -> None:
        await cancel_and_wait(self._resolver)
        for node in list(self.nodes.values()):
            await node.close()
        self.nodes.clear()

    async def settle(self, within: float) -> bool:
        """Waits, no longer than `within` seconds after the Router started, for every node's first
        list of models; True when there was anything to wait for (a model may be on a node not yet heard)."""
        loop = asyncio.get_running_loop()
        deadline = self._started + within
        waited = False
        while any(not node.models_heard for node in self.nodes.values()) and loop.time() < deadline:
            waited = True
            await asyncio.sleep(0.05)
        return waited

    def candidates(self, model_id: str) -> list[Node]:
        """Nodes to start a cold model on: those with its file READY, fewest backends first."""
        with_file = self._catalog.nodes_with(model_id)
        keys = with_file or sorted(self.nodes)
        return sorted(
            (self.nodes[key] for key in keys if key in self.nodes),
            key=lambda node: (not node.reachable, self._table.backends_on(node.key), node.key),
        )

    # --- following one node ----------------------------------------------------------------------
    def _follow(self, key: str, registry_address: str, supervisor_address: str) -> None:
        options = self._channel_options() if self.clustered else None
        registry_channel = grpc.aio.insecure_channel(registry_address, options=options)
        supervisor_channel = grpc.aio.insecure_channel(supervisor_address, options=options)
        registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
        supervisor = supervisor_service_pb2_grpc.SupervisorServiceStub(supervisor_channel)
        node = Node(key, registry_channel, supervisor_channel, supervisor)
        name = f"node {key}" if key else ""

        def on_models(message: registry_service_pb2.WatchModelsResponse) -> None:
            node.models_heard = True
            self._catalog.apply(message, key)

        def on_backends(message: supervisor_service_pb2.WatchBackendsResponse) -> None:
            if not node.reachable and key:
                log.info("following node %s", key)
            node.reachable = True
            node.forgotten = False
            if node.lost_timer is not None:
                node.lost_timer.cancel()
                node.lost_timer = None
            self._table.apply(message, key)
            self._count()

        def on_supervisor_lost() -> None:
            node.reachable = False
            self._table.suspend(key)
            if node.lost_timer is None and not node.forgotten:
                node.lost_timer = asyncio.get_running_loop().call_later(
                    self._settings.node_lost_seconds, self._forget, node
                )
            self._count()

        node.watchers = [
            asyncio.create_task(
                follow_watch(
                    f"{name} registry".strip(),
                    lambda: registry.WatchModels(registry_service_pb2.WatchModelsRequest()),
                    on_models,
                ),
            ),
            asyncio.create_task(
                follow_watch(
                    f"{name} supervisor".strip(),
                    lambda: supervisor.WatchBackends(supervisor_service_pb2.WatchBackendsRequest()),
                    on_backends,
                    on_supervisor_lost,
                ),
            ),
        ]
        self.nodes[key] = node
        self._count()

    def _forget(self, node: Node) -> None:
        node.lost_timer = None
        if node.reachable:
            return
        node.forgotten = True
        log.warning("node %s lost: its backends leave the routing table", node.key or "(local)")
        self._table.forget(node.key)
        self._catalog.forget(node.key)
        self._count()

    def _channel_options(self) -> list[tuple[str, int]]:
        interval_ms = int(self._settings.node_keepalive_seconds * 1000)
        return [
            ("grpc.keepalive_time_ms", interval_ms),
            ("grpc.keepalive_timeout_ms", interval_ms),
            # What bounds a ping's wait for its ack in gRPC core (60 s by default, whatever the keepalive timeout).
            ("grpc.http2.ping_timeout_ms", interval_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Reconnect quickly to a node that comes back (the default backoff grows to 2 minutes).
            ("grpc.max_reconnect_backoff_ms", 5_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
        ]

    def _count(self) -> None:
        up = sum(1 for node in self.nodes.values() if node.reachable)
        metrics.NODES.labels("reachable").set(up)
        metrics.NODES.labels("unreachable").set(len(self.nodes) - up)

    # --- following the node list -------------------------------------------------------------
    async def _keep_resolving(self) -> None:
        while True:
            await asyncio.sleep(self._settings.node_resolve_seconds)
            try:
                await self._refresh()
            except Exception:  # never let one bad round stop the following
                log.exception("resolving the nodes failed")

    async def _refresh(self) -> None:
        wanted: set[str] = set()
        for entry in _entries(self._settings.nodes):
            wanted |= await self._resolve(entry)
        for key in sorted(wanted - set(self.nodes)):
            log.info("node %s joined", key)
            self._follow(
                key,
                _join(key, self._settings.node_registry_port),
                _join(key, self._settings.node_supervisor_port),
            )
        for key in sorted(set(self.nodes) - wanted):
            log.info("node %s left the node list: draining it", key)
            node = self.nodes.pop(key)
            self._table.suspend(key)
            self._catalog.forget(key)
            await node.close()
            self._table.release(key)
            self._count()

    async def _resolve(self, entry: str) -> set[str]:
        try:
            return {str(ipaddress.ip_address(entry.strip("[]")))}
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(entry, None, type=socket.SOCK_STREAM)
        except OSError as error:
            kept = self._resolved.get(entry, set())
            log.warning("cannot resolve node name %s (%s); keeping %d known node(s)", entry, error, len(kept))
            return kept
        addresses = {str(info[4][0]) for info in infos}
        self._resolved[entry] = addresses
        return addresses


def _entries(nodes: str) -> list[str]:
    return [entry.strip() for entry in nodes.split(",") if entry.strip()]


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
