"""The Embedding service process: gRPC server, one model thread, the micro-batcher, and shutdown.

The server listens at once with health NOT_SERVING, loads and warms the model in its worker thread,
then reports SERVING. Shutdown goes the other way: NOT_SERVING, in-flight RPCs drain, the batcher
stops, the model thread ends.

`lmcluster serve embedding` runs `main()`; tests use `EmbeddingServer` on port 0 in their own loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Self

from lmcluster.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from services.common.binaries import PartMissingError
from services.common.server import ServiceHost, run_service
from services.embedding.batcher import MicroBatcher
from services.embedding.encoder import EmbeddedText, Encoder, ModelLoadError, load_from_settings
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
        await server.stop()    # NOT_SERVING, drain, batcher and model thread stopped

    `async with EmbeddingServer(settings) as server:` does start and load, then stop.
    """

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self.host = ServiceHost("embedding", settings, [SERVICE_NAME])
        self.servicer = EmbeddingServicer(Limits.from_settings(settings))
        self.host.add(pb_grpc.add_EmbeddingServiceServicer_to_server, self.servicer)
        # The only thread that touches the model: loading, warm-up and every batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding-model")
        self._batcher: MicroBatcher[EmbeddedText] | None = None
        self.encoder: Encoder | None = None

    @property
    def port(self) -> int:
        return self.host.port

    async def start(self) -> int:
        """Listens (health NOT_SERVING); returns the bound port."""
        return await self.host.start()

    async def load(self) -> None:
        """Loads and warms up the model in the model thread, then reports SERVING."""
        loop = asyncio.get_running_loop()
        encoder = await loop.run_in_executor(self._executor, load_from_settings, self.settings)
        if self.settings.warmup:
            await loop.run_in_executor(self._executor, encoder.warm_up)
        self.encoder = encoder
        self._batcher = MicroBatcher(
            encoder.encode,
            self._executor,
            window_seconds=self.settings.batch_window_ms / 1000,
            max_batch_size=self.settings.max_batch_size,
        )
        self._batcher.start()
        self.servicer.attach(LoadedModel(encoder.name, encoder.dimensions, self._batcher))
        await self.host.set_serving(True)
        log.info(
            "embedding %s with %s: batches of up to %d texts within %.1f ms",
            encoder.name,
            encoder.backend,
            self.settings.max_batch_size,
            self.settings.batch_window_ms,
        )

    async def stop(self) -> None:
        """NOT_SERVING, drain in-flight RPCs, stop the batcher, then end the model thread."""
        await self.host.stop()
        if self._batcher is not None:
            await self._batcher.close()
        # Waiting on a no-op in the (single) model thread waits out whatever runs there now,
        # without blocking the event loop; the shutdown after it is immediate.
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)
        self._executor.shutdown(wait=True)
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
