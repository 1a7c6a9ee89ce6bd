"""The Embedding service process: gRPC server, the model lanes (services/embedding/lanes.py), and
shutdown.

The server listens at once with health NOT_SERVING, loads and warms the interactive lane's model,
then reports SERVING; the background lane's copy loads after that, at its own priority. Shutdown
goes the other way: NOT_SERVING, in-flight RPCs drain, the batchers stop, the model threads end.

`lmcluster serve embedding` runs `main()`; tests use `EmbeddingServer` on port 0 in their own loop.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Self

from lmcluster.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from services.common.binaries import PartMissingError
from services.common.server import ServiceHost, run_service
from services.embedding.encoder import Encoder, ModelLoadError, load_from_settings
from services.embedding.lanes import Lanes, ThreadPolicy
from services.embedding.servicer import SERVICE_NAME, EmbeddingServicer, Limits, LoadedModel
from services.embedding.settings import EmbeddingSettings

log = logging.getLogger(__name__)


class EmbeddingServer:
    """The Embedding service in this process.

    Usage::

        server = EmbeddingServer(settings)
        await server.start()   # listening, health NOT_SERVING
        await server.load()    # model loaded and warmed up, health SERVING
        ...
        await server.stop()    # NOT_SERVING, drain, batchers and model threads stopped

    `async with EmbeddingServer(settings) as server:` does start and load, then stop.
    """

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self.host = ServiceHost("embedding", settings, [SERVICE_NAME])
        self.servicer = EmbeddingServicer(Limits.from_settings(settings))
        self.host.add(pb_grpc.add_EmbeddingServiceServicer_to_server, self.servicer)
        self.lanes = Lanes.open(settings.background_lane)
        self._background_load: asyncio.Task[None] | None = None
        self.encoder: Encoder | None = None

    @property
    def port(self) -> int:
        return self.host.port

    async def start(self) -> int:
        """Listens (health NOT_SERVING); returns the bound port."""
        return await self.host.start()

    async def load(self) -> None:
        """Loads and warms up the interactive model, reports SERVING, then starts loading the
        background lane's copy (`background_loaded` waits for it)."""
        load = partial(load_from_settings, self.settings)
        await self.lanes.interactive.load(load, self.settings, "normal")
        encoder = self.lanes.interactive.encoder
        assert encoder is not None
        self.encoder = encoder
        self.servicer.attach(LoadedModel(encoder.name, encoder.dimensions, self.lanes))
        await self.host.set_serving(True)
        log.info(
            "embedding %s with %s: batches of up to %d texts within %.1f ms",
            encoder.name,
            encoder.backend,
            self.settings.max_batch_size,
            self.settings.batch_window_ms,
        )
        background = self.lanes.background
        if background is not None:
            policy: ThreadPolicy = "idle" if self.settings.background_lane == "idle" else "normal"
            one_thread = partial(load_from_settings, self.settings.model_copy(update={"threads": 1}))
            self._background_load = asyncio.create_task(
                background.load(one_thread, self.settings, policy), name="embedding-background-load"
            )
            self._background_load.add_done_callback(self._background_ready)

    def _background_ready(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("the background lane's model failed to load; background texts share the interactive lane",
                      exc_info=task.exception())
            return
        assert self.lanes.background is not None
        log.info("background lane ready (thread under %s)", self.lanes.background.policy)

    async def background_loaded(self) -> None:
        """Waits until the background lane embeds on its own (at once without one)."""
        if self._background_load is not None:
            await asyncio.shield(self._background_load)

    async def stop(self) -> None:
        """NOT_SERVING, drain in-flight RPCs, stop the batchers, then end the model threads."""
        await self.host.stop()
        if self._background_load is not None and not self._background_load.done():
            # The load runs in the lane's thread, which close() waits out.
            await asyncio.wait({self._background_load})
        await self.lanes.close()
        log.info("embedding stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        try:
            await self.load()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(settings: EmbeddingSettings) -> None:
    """Runs the service until SIGTERM/SIGINT."""
    server = EmbeddingServer(settings)
    await server.start()
    server.host.install_signal_handlers()
    loading = asyncio.create_task(server.load(), name="embedding-load")
    stopping = asyncio.create_task(server.host.wait_for_shutdown(), name="embedding-stop")
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            try:
                loading.result()
            except (ModelLoadError, PartMissingError) as error:
                log.error("cannot load the embedding model: %s", error)
                raise SystemExit(1) from error
            await stopping
    finally:
        for task in (loading, stopping):
            task.cancel()
        await asyncio.gather(loading, stopping, return_exceptions=True)
        await server.stop()


def main() -> None:
    settings = EmbeddingSettings()
    run_service("embedding", settings, lambda _: serve(settings))


if __name__ == "__main__":
    main()
