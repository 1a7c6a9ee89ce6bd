"""SupervisorService: the gRPC face of the Fleet."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb
from lmcluster.supervisor.v1 import supervisor_service_pb2_grpc as pb_grpc

from services.supervisor.backend import BackendUnavailable
from services.supervisor.capacity import DoesNotFit
from services.supervisor.fleet import Fleet, ModelNotFound, ModelNotServable, RegistryUnavailable, WatchOverflow
from services.supervisor.ports import PortsExhausted

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SupervisorService"].full_name

# Domain errors and the status a caller can act on.
_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ModelNotServable, grpc.StatusCode.FAILED_PRECONDITION),
    (DoesNotFit, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PortsExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_of(error: Exception) -> grpc.StatusCode | None:
    return next((code for kind, code in _STATUS if isinstance(error, kind)), None)


class SupervisorServicer(pb_grpc.SupervisorServiceServicer):
    def __init__(self, fleet: Fleet, shutting_down: asyncio.Event | None = None) -> None:
        self.fleet = fleet
        self._shutting_down = shutting_down or asyncio.Event()

    async def _abort_for(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        code = status_of(error)
        if code is None:
            raise error
        await context.abort(code, str(error))

    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBackendsResponse:
        return pb.ListBackendsResponse(
            backends=[b.to_proto() for b in self.fleet.listing(request.model.strip())],
            memory=self.fleet.memory(),
        )

    async def EnsureBackend(
        self, request: pb.EnsureBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnsureBackendResponse:
        model = request.model.strip()
        if not model:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "model is empty: give a model id or alias (see `lmcluster models`)"
            )
        try:
            backend = await self.fleet.ensure(model, request.variant.strip())
        except Exception as error:  # mapped to a status, or re-raised
            await self._abort_for(context, error)
            raise
        return pb.EnsureBackendResponse(backend=backend.to_proto())

    async def StopBackend(
        self, request: pb.StopBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopBackendResponse:
        target = request.WhichOneof("target")
        value = (getattr(request, target) if target else "").strip()
        if not value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give backend_id or model to stop")
        try:
            if target == "backend_id":
                stopped = await self.fleet.stop_backends(backend_id=value, force=request.force)
            else:
                stopped = await self.fleet.stop_backends(model=value, force=request.force)
        except Exception as error:
            await self._abort_for(context, error)
            raise
        return pb.StopBackendResponse(backends=[b.to_proto() for b in stopped])

    async def WatchBackends(
        self, request: pb.WatchBackendsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchBackendsResponse]:
        stream = self.fleet.watch()
        stop = asyncio.create_task(self._shutting_down.wait())
        step: asyncio.Future[pb.WatchBackendsResponse] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    return  # the server is shutting down
                try:
                    message = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield message
        except WatchOverflow as error:
            await context.abort(grpc.StatusCode.ABORTED, str(error))
        finally:
            stop.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                    await step
            await stream.aclose()
