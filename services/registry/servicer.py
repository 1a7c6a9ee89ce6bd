"""RegistryService: the model table over gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.registry.catalog import ModelCatalog
from services.registry.fingerprint import FilesChangedError
from services.registry.gguf_validation import GgufProblem
from services.registry.subscriptions import Resync

log = logging.getLogger(__name__)


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """Answers from the catalog; every RPC waits for the first full scan, so no answer is partial.

    `WatchModels` sends a snapshot (projectors included, with their kind), then one event per
    change. A client that falls behind by more than the per-stream buffer gets a fresh snapshot
    instead of the events it missed (see subscriptions.py). Streams end with OK when the server
    shuts down (`shutting_down` set).
    """

    def __init__(self, catalog: ModelCatalog, shutting_down: asyncio.Event) -> None:
        self._catalog = catalog
        self._shutting_down = shutting_down

    async def ListModels(
        self, request: registry_service_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_service_pb2.ListModelsResponse:
        await self._catalog.wait_ready()
        states = set(request.states)
        models = [
            model
            for model in self._catalog.models()
            if (not states or model.state in states)
            and (request.include_projectors or model.kind != registry_pb2.MODEL_KIND_PROJECTOR)
        ]
        return registry_service_pb2.ListModelsResponse(models=models)

    async def GetModel(
        self, request: registry_service_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_service_pb2.GetModelResponse:
        if not request.model.strip():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "GetModelRequest.model is empty: pass a model id or alias"
            )
        await self._catalog.wait_ready()
        model = self._catalog.lookup(request.model)
        if model is None:
            hint = self._catalog.suggestions(request.model)
            did_you_mean = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no model {request.model!r} in {self._catalog.root}{did_you_mean} "
                "(`lmcluster models` lists the ids)",
            )
        if request.compute_sha256:
            model = await self._with_sha256(model, context)
        return registry_service_pb2.GetModelResponse(model=model)

    async def _with_sha256(
        self, model: registry_pb2.Model, context: grpc.aio.ServicerContext
    ) -> registry_pb2.Model:
        if model.state == registry_pb2.MODEL_STATE_DOWNLOADING:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model.id!r} is still being written; ask for its SHA-256 once it is READY",
            )
        try:
            digest = await self._catalog.sha256(model)
        except FilesChangedError as exc:
            await context.abort(grpc.StatusCode.ABORTED, f"{exc}; retry once the file is stable")
        except GgufProblem as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot hash {model.id!r}: {exc.message}"
            )
        except OSError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot hash {model.id!r}: {exc}")
        with_digest = registry_pb2.Model()
        with_digest.CopyFrom(model)
        with_digest.fingerprint.sha256 = digest
        return with_digest

    async def WatchModels(
        self, request: registry_service_pb2.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_service_pb2.WatchModelsResponse]:
        await self._catalog.wait_ready()
        subscription, revision, models = self._catalog.subscribe()
        stopper = asyncio.ensure_future(self._shutting_down.wait())
        stopper.add_done_callback(lambda _: subscription.close())
        try:
            yield _snapshot(revision, models)
            while True:
                item = await subscription.next()
                if item is None:
                    return
                if item is Resync.NEEDED:
                    log.warning("a WatchModels client fell behind; sending it a fresh snapshot")
                    yield _snapshot(self._catalog.revision, self._catalog.models())
                    continue
                yield item
        finally:
            stopper.cancel()
            self._catalog.unsubscribe(subscription)


def _snapshot(revision: int, models: list[registry_pb2.Model]) -> registry_service_pb2.WatchModelsResponse:
    return registry_service_pb2.WatchModelsResponse(
        revision=revision, snapshot=registry_service_pb2.ModelSnapshot(models=models)
    )
