"""The models the Router can serve, followed from the Registry's WatchModels.

A request names a model by id, alias or base id. A base id (or the alias of the best variant) is
routed across the quantization variants of that model; a full variant id pins that variant.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from lmcluster.registry.v1 import registry_pb2, registry_service_pb2
from lmcluster.router.v1 import openai_pb2, router_service_pb2

from services.router.errors import ModelNotFound, ModelUnavailable

READY = registry_pb2.MODEL_STATE_READY


@dataclass(frozen=True)
class ModelRoute:
    """Where a requested model name leads: the variants to try, best first."""

    requested: str
    variant_ids: tuple[str, ...]
    pinned: bool


class ModelCatalog:
    """The models of every node, merged: a model id names the same file path on every node.

    Each node's WatchModels replaces that node's part only (a snapshot after a reconnect never
    patches across a gap); the merged record of a model is a READY one when some node has it READY.
    """

    def __init__(self) -> None:
        self._by_node: dict[str, dict[str, registry_pb2.Model]] = {}
        self._models: dict[str, registry_pb2.Model] = {}
        self._names: dict[str, str] = {}
        self.revision = 0
        self.synced = False
        self._synced = asyncio.Event()

    def apply(self, message: registry_service_pb2.WatchModelsResponse, node: str = "") -> None:
        kind = message.WhichOneof("update")
        if kind == "snapshot":
            self._by_node[node] = {m.id: m for m in message.snapshot.models}
            self.synced = True
            self._synced.set()
        elif kind == "event":
            models = self._by_node.setdefault(node, {})
            event = message.event
            if event.type == registry_service_pb2.MODEL_EVENT_TYPE_REMOVED:
                models.pop(event.model.id, None)
            else:
                models[event.model.id] = event.model
        self.revision += 1
        self._merge()

    def forget(self, node: str) -> None:
        """A node that left: its models are served only from the nodes that also have them."""
        if self._by_node.pop(node, None) is not None:
            self.revision += 1
            self._merge()

    def _merge(self) -> None:
        merged: dict[str, registry_pb2.Model] = {}
        for node in sorted(self._by_node):
            for model_id, model in self._by_node[node].items():
                held = merged.get(model_id)
                if held is None or (held.state != READY and model.state == READY):
                    merged[model_id] = model
        self._models = merged
        self._reindex()

    def nodes_with(self, model_id: str) -> list[str]:
        """The nodes whose Registry has the model's file READY, in a stable order."""
        return sorted(
            node for node, models in self._by_node.items()
            if (model := models.get(model_id)) is not None and model.state == READY
        )  # fmt: skip

    def _reindex(self) -> None:
        names: dict[str, str] = {}
        for model in self._models.values():
            if model.kind != registry_pb2.MODEL_KIND_LLM:
                continue
            names.setdefault(model.id, model.id)
            names.setdefault(model.id.lower(), model.id)
            if model.alias:
                names.setdefault(model.alias.lower(), model.id)
        self._names = names

    async def wait_synced(self, timeout: float) -> bool:
        """Waits (bounded) for the Registry's first snapshot: a Router just (re)started is not yet an error."""
        if not self.synced:
            try:
                async with asyncio.timeout(timeout):
                    await self._synced.wait()
            except TimeoutError:
                return False
        return True

    def get(self, model_id: str) -> registry_pb2.Model | None:
        return self._models.get(model_id)

    def _base_variants(self, base_id: str) -> list[registry_pb2.Model]:
        variants = [m for m in self._models.values() if m.base_id == base_id and m.kind == registry_pb2.MODEL_KIND_LLM]
        # The Registry orders `variants` best first; fall back to size for models not listed there.
        order = {v.model_id: i for m in variants for i, v in enumerate(m.variants)}
        return sorted(variants, key=lambda m: (order.get(m.id, len(order)), -m.size_bytes))

    def resolve(self, name: str, serving: Callable[[str], bool] = lambda _model_id: False) -> ModelRoute:
        """Raises ModelNotFound for a name nobody knows, ModelUnavailable for a model with nothing to serve.

        `serving(model_id)` tells whether a backend already serves the model: such a model stays
        routable while the Registry re-checks its file (DOWNLOADING) or finds a new one INVALID,
        because the backend keeps the weights it loaded.
        """
        key = name.strip()
        model_id = self._names.get(key) or self._names.get(key.lower())
        if model_id is None:
            base = [m for m in self._models.values() if m.base_id and m.base_id.lower() == key.lower()]
            if not base:
                raise ModelNotFound(f"The model `{name}` does not exist. GET /v1/models lists the models.", param="model")
            ready = [m.id for m in self._base_variants(base[0].base_id) if m.state == READY or serving(m.id)]
            if not ready:
                raise ModelUnavailable(f"No variant of `{name}` is ready to serve.", param="model")
            return ModelRoute(name, tuple(ready), pinned=False)
        model = self._models[model_id]
        if model.state != READY and not serving(model_id):
            state = registry_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_")
            raise ModelUnavailable(f"The model `{name}` is {state}: {model.reason or 'not ready'}", param="model")
        return ModelRoute(name, (model_id,), pinned=True)

    def list_models(
        self, serving: Callable[[str], bool] = lambda _model_id: False
    ) -> router_service_pb2.ListModelsResponse:
        response = router_service_pb2.ListModelsResponse(object="list")
        seen: set[str] = set()
        for model in sorted(self._models.values(), key=lambda m: m.id):
            if model.kind != registry_pb2.MODEL_KIND_LLM or (model.state != READY and not serving(model.id)):
                continue
            variants = [v.model_id for v in model.variants if v.model_id != model.id]
            created = int(model.discovered_at.seconds or time.time())
            for name in (model.id, model.alias):
                if name and name not in seen:
                    seen.add(name)
                    response.data.append(
                        openai_pb2.ModelCard(
                            id=name, object="model", created=created, owned_by=model.publisher or "lmcluster",
                            model_id=model.id, quantization=model.quantization,
                            context_length=model.context_length, variants=variants,
                        )
                    )
            if model.base_id and len(model.variants) > 1 and model.base_id not in seen:
                seen.add(model.base_id)
                response.data.append(
                    openai_pb2.ModelCard(
                        id=model.base_id, object="model", created=created, owned_by=model.publisher or "lmcluster",
                        model_id=model.base_id, quantization="auto", context_length=model.context_length,
                        variants=[v.model_id for v in model.variants],
                    )
                )
        return response
