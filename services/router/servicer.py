"""RouterService: the OpenAI-compatible request path.

validate → resolve the model → cache (exact, then semantic) → on a hit, answer from the cache
(as a stream of chunks for streaming calls) → on a miss, lease a backend slot from the local
routing table (EnsureBackend only for a cold model) → stream tokens from llama-server, relaying
them as they arrive → store the whole answer in the cache after the client has it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import logging
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from lmcluster.embedding.v1 import embedding_service_pb2, embedding_service_pb2_grpc
from lmcluster.router.v1 import openai_pb2 as pb
from lmcluster.router.v1 import router_service_pb2, router_service_pb2_grpc
from lmcluster.supervisor.v1 import supervisor_service_pb2

from services.common import gateway
from services.router import affinity, assembly, codec, fields, metrics, observe, responses
from services.common.cache_scope import CacheScope, weights_identity
from services.router.caching import AnswerCache, CacheDecision, same_weights, tenant_of
from services.router.catalog import ModelCatalog, ModelRoute
from services.router.errors import (
    BackendTimeout,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    RouterError,
    StreamBroken,
)
from services.router.generation import Coalescer, Generation, Subscription
from services.router.llama_client import LlamaClient
from services.router.nodes import Node, NodeSet
from services.router.routing import RoutingTable
from services.router.settings import RouterSettings

log = logging.getLogger(__name__)

MAX_EMBEDDING_INPUTS = 256
# Initial metadata beside x-lmc-cache on a hit: "exact" or "semantic" (a header for REST clients).
CACHE_KIND_HEADER = "x-lmc-cache-kind"


@dataclass(frozen=True)
class GenerationApi:
    """What differs between chat and text completions."""

    name: str
    path: str
    response_type: type[Message]
    new_assembler: Callable[[], Any]
    chunk: Callable[[dict[str, Any], str], Message]
    replay: Callable[..., list[Any]]
    chunk_type: type[Message]
    chunk_object: str


CHAT = GenerationApi(
    "chat", "/v1/chat/completions", pb.CreateChatCompletionResponse, assembly.ChatAssembler,
    codec.chat_chunk, assembly.replay_chat, pb.CreateChatCompletionStreamResponse, "chat.completion.chunk",
)
COMPLETION = GenerationApi(
    "completion", "/v1/completions", pb.CreateCompletionResponse, assembly.CompletionAssembler,
    codec.completion_chunk, assembly.replay_completion, pb.CreateCompletionStreamResponse, "text_completion",
)


@dataclass
class Prepared:
    route: ModelRoute
    decision: CacheDecision
    started: float
    # A generation started on a free slot while the semantic lookup ran, already held for this request.
    early: Subscription | None = None

    def take_early(self) -> Subscription | None:
        early, self.early = self.early, None
        return early


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        settings: RouterSettings,
        *,
        catalog: ModelCatalog,
        table: RoutingTable,
        cache: AnswerCache,
        llama: LlamaClient,
        nodes: NodeSet,
        embedding: embedding_service_pb2_grpc.EmbeddingServiceStub,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._table = table
        self._cache = cache
        self._llama = llama
        self._nodes = nodes
        self._embedding = embedding
        self._coalescer = Coalescer(settings.coalesce_stall_seconds)
        self._cold_starts: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        await self._coalescer.close()
        for task in self._cold_starts.values():
            task.cancel()

    # --- RPCs --------------------------------------------------------------------------------
    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateChatCompletionResponse:
        return await self._unary(CHAT, request, context)  # type: ignore[return-value]

    async def StreamChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CreateChatCompletionStreamResponse]:
        async for chunk in self._stream(CHAT, request, context):
            yield chunk

    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCompletionResponse:
        return await self._unary(COMPLETION, request, context)  # type: ignore[return-value]

    async def StreamCompletion(
        self, request: pb.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CreateCompletionStreamResponse]:
        async for chunk in self._stream(COMPLETION, request, context):
            yield chunk

    async def CreateResponse(self, request: pb.CreateResponseRequest, context: grpc.aio.ServicerContext) -> pb.Response:
        chat = await self._response_as_chat(request, context)
        answer = await self._unary(CHAT, chat, responses.ChatContext(context))
        return responses.from_chat(request, answer)  # type: ignore[arg-type]

    async def StreamResponse(
        self, request: pb.CreateResponseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResponseStreamEvent]:
        chat = await self._response_as_chat(request, context)
        chat.stream_options.include_usage = True  # the usage chunk completes the response
        stream = responses.ResponseStream(request)
        async for chunk in self._stream(CHAT, chat, responses.ChatContext(context)):
            for event in stream.events(chunk):  # type: ignore[arg-type]
                yield event

    async def _response_as_chat(
        self, request: pb.CreateResponseRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateChatCompletionRequest:
        try:
            fields.check_fields(request, context.invocation_metadata())
            return responses.to_chat(request)
        except RouterError as error:
            await _abort(context, error)
            raise

    async def ListModels(
        self, request: router_service_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_service_pb2.ListModelsResponse:
        return self._catalog.list_models(self._table.serves)

    async def GetModel(
        self, request: router_service_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelCard:
        """The ListModels entry named by id, alias or base id (ids contain slashes)."""
        name = request.model.strip()
        cards = (await self.ListModels(router_service_pb2.ListModelsRequest(), context)).data
        for card in [c for c in cards if c.id == name] or [c for c in cards if c.id.lower() == name.lower()]:
            return card
        error = ModelNotFound(f"The model `{request.model}` does not exist. GET /v1/models lists the models.", param="model")
        await _abort(context, error)
        raise error  # unreachable: abort raises

    async def DeleteCacheEntry(
        self, request: router_service_pb2.DeleteCacheEntryRequest, context: grpc.aio.ServicerContext
    ) -> router_service_pb2.DeleteCacheEntryResponse:
        """Removes a cached answer reported wrong; 404 when no entry has that id."""
        entry = request.entry.strip().lower()
        if not entry or len(entry) > 64 or not set(entry) <= set("0123456789abcdef"):
            await gateway.abort_with_openai_error(
                context, grpc.StatusCode.NOT_FOUND, f"No cache entry `{request.entry[:80]}`.",
                type="invalid_request_error", code="cache_entry_not_found", param="entry",
            )  # fmt: skip
        try:
            deleted = await self._cache.forget(entry)
        except grpc.aio.AioRpcError as error:
            await gateway.abort_with_openai_error(
                context, grpc.StatusCode.UNAVAILABLE, f"The cache cannot remove entries now: {error.details()}",
                type="server_error", code="cache_unavailable", retry_after=2,
            )  # fmt: skip
        if not deleted:
            await gateway.abort_with_openai_error(
                context, grpc.StatusCode.NOT_FOUND, f"No cache entry `{entry}` (it may have expired).",
                type="invalid_request_error", code="cache_entry_not_found", param="entry",
            )  # fmt: skip
        return router_service_pb2.DeleteCacheEntryResponse(id=entry, object="cache.entry", deleted=True)

    async def CreateEmbedding(
        self, request: pb.CreateEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateEmbeddingResponse:
        try:
            fields.check_fields(request, context.invocation_metadata())
            texts = _embedding_inputs(request)
            encoding = request.encoding_format or "float"
            if encoding not in ("float", "base64"):
                raise InvalidRequest("`encoding_format` must be 'float' or 'base64'", param="encoding_format")
            try:
                reply = await self._embedding.Embed(
                    embedding_service_pb2.EmbedRequest(texts=texts), timeout=_remaining(context, 30.0)
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(error.details() or "invalid input", param="input") from error
                raise ModelUnavailable(f"the embedding service failed: {error.details()}") from error
            dimensions = request.dimensions if request.HasField("dimensions") else 0
            if dimensions and not 1 <= dimensions <= reply.dimensions:
                raise InvalidRequest(f"`dimensions` must be between 1 and {reply.dimensions}", param="dimensions")
            response = pb.CreateEmbeddingResponse(object="list", model=reply.model)
            tokens = 0
            for index, embedding in enumerate(reply.embeddings):
                vector = _shorten(list(embedding.vector), dimensions)
                tokens += embedding.token_count
                item = response.data.add(object="embedding", index=index)
                if encoding == "base64":
                    item.embedding.string_value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                else:
                    item.embedding.list_value.extend(vector)
            response.usage.prompt_tokens = tokens
            response.usage.total_tokens = tokens
            return response
        except RouterError as error:
            await _abort(context, error)
            raise  # unreachable: abort raises

    # --- the request path ----------------------------------------------------------------------
    async def _prepare(self, api: GenerationApi, request: codec.GenerationRequest, tenant: str = "") -> Prepared:
        started = time.perf_counter()
        codec.validate(request)
        if not await self._catalog.wait_synced(self._settings.startup_wait_seconds):
            raise ModelUnavailable("the Router has not heard from the Registry yet; retry shortly", retry_after=2)
        try:
            route = self._catalog.resolve(request.model, self._table.serves)
        except (ModelNotFound, ModelUnavailable):
            # Just after start, a node not yet heard from may have the model.
            if not await self._nodes.settle(self._settings.startup_wait_seconds):
                raise
            route = self._catalog.resolve(request.model, self._table.serves)
        codec.check_modalities(request, map(self._catalog.get, route.variant_ids))
        best = self._catalog.get(route.variant_ids[0])
        base_model = (best.base_id if best is not None and not route.pinned else "") or route.variant_ids[0]
        weights = weights_identity(m for m in map(self._catalog.get, route.variant_ids) if m is not None)
        early: Subscription | None = None
        request_context = contextvars.copy_context()  # the generation's spans belong to the request, not the lookup

        def start_early(scope: CacheScope) -> None:
            # Prompt processing overlaps the embedding and the KNN lookup; only where a slot is free,
            # so a generation that a semantic hit cancels never delays anyone's.
            nonlocal early
            if self._settings.overlap_lookup and self._table.has_free_slot(route.variant_ids):
                early = request_context.run(self._start_generation, api, request, route, scope.exact_key).join()
                early.hold()

        try:
            decision = await self._cache.lookup(
                request, base_model, weights=weights, tenant=tenant, on_exact_miss=start_early
            )
        except BaseException:
            if early is not None:
                early.leave()
            raise
        prepared = Prepared(route, decision, started)
        if early is not None:
            if decision.status == "miss":
                prepared.early = early
                metrics.OVERLAPPED.labels("used").inc()
            else:
                early.leave()  # the last reader leaving cancels the backend request
                metrics.OVERLAPPED.labels("dropped").inc()
        return prepared

    async def _unary(self, api: GenerationApi, request: codec.GenerationRequest, context: grpc.aio.ServicerContext) -> Message:
        cache_label, result = "none", "error"
        try:
            async with _deadline(context):
                fields.check_fields(request, context.invocation_metadata())
                prepared = await self._prepare(api, request, tenant_of(context.invocation_metadata()))
                cache_label = prepared.decision.status
                cached = prepared.decision.parse(api.response_type) if prepared.decision.status == "hit" else None
                if cached is not None:
                    await context.send_initial_metadata(_cache_metadata(prepared.decision))
                    metrics.TIME_TO_FIRST_TOKEN.labels("hit").observe(time.perf_counter() - prepared.started)
                    result = "ok"
                    return _fresh(cached)
                if prepared.decision.status == "hit":
                    prepared.decision.status = "miss"
                    cache_label = "miss"
                generation, assembler = await self._generate_whole(api, request, prepared, cache_label)
                response = assembler.response(generation.model_id)
                await context.send_initial_metadata(_cache_metadata(prepared.decision))
                self._after_generation(api, request, prepared, assembler, response, generation)
                result = "ok"
                return response
        except RouterError as error:
            result = error.error_code
            await _abort(context, error)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # a bug: still OpenAI's error shape, and the trace in the log
            log.exception("%s request failed", api.name)
            result = "internal_error"
            await _abort(context, _internal(error))
            raise
        finally:
            metrics.REQUESTS.labels(api.name, cache_label, result).inc()

    async def _generate_whole(
        self, api: GenerationApi, request: codec.GenerationRequest, prepared: Prepared, cache_label: str
    ) -> tuple[Generation, Any]:
        """A whole answer for a unary call. The client has seen nothing until it is complete, so a
        backend lost mid-answer (crashed, killed, its node gone) costs a fresh generation on another
        backend, not the request; bounded by the recovery wait."""
        first_failure = 0.0
        while True:
            subscription = self._subscription(api, request, prepared)
            generation = subscription.generation
            assembler = api.new_assembler()
            first = True
            try:
                async with contextlib.aclosing(subscription.events()) as events:
                    async for event in events:
                        if first:
                            metrics.TIME_TO_FIRST_TOKEN.labels(cache_label).observe(time.perf_counter() - prepared.started)
                            first = False
                        assembler.add(event)
                return generation, assembler
            except StreamBroken as error:
                first_failure = first_failure or time.monotonic()
                if time.monotonic() - first_failure >= self._settings.recovery_wait_seconds:
                    raise
                metrics.RETRIES.inc()
                log.warning("%s answer lost mid-way (%s); generating it again", api.name, error.message)

    async def _stream(
        self, api: GenerationApi, request: codec.GenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        include_usage = request.stream_options.include_usage if request.HasField("stream_options") else False
        rest = gateway.came_through_rest(context)
        cache_label, result, sent_any = "none", "error", False
        try:
            async with _deadline(context):
                fields.check_fields(request, context.invocation_metadata())
                prepared = await self._prepare(api, request, tenant_of(context.invocation_metadata()))
                cache_label = prepared.decision.status
                cached = prepared.decision.parse(api.response_type) if prepared.decision.status == "hit" else None
                if cached is not None:
                    await context.send_initial_metadata(_cache_metadata(prepared.decision))
                    metrics.TIME_TO_FIRST_TOKEN.labels("hit").observe(time.perf_counter() - prepared.started)
                    for chunk in api.replay(_fresh(cached), include_usage=include_usage):
                        sent_any = True
                        yield chunk
                else:
                    if prepared.decision.status == "hit":
                        prepared.decision.status = cache_label = "miss"
                    assembler = api.new_assembler()
                    # A client that goes away (or whose deadline passes) while grpc.aio is sending
                    # gets its handler cancelled in grpc's code, and grpc never closes a generator
                    # handler: this one would stay suspended until the garbage collector found it,
                    # the backend generating for nobody. The RPC's done callback ends the
                    # subscription at once instead; the last subscriber leaving cancels the
                    # llama-server request, which frees its slot.
                    subscription = self._subscription(api, request, prepared)
                    generation = subscription.generation
                    _when_done(context, subscription.leave)
                    async with contextlib.aclosing(subscription.events()) as events:
                        async for event in events:
                            assembler.add(event)
                            chunk = api.chunk(event, generation.model_id)
                            if not chunk.choices and not include_usage:
                                continue  # the usage chunk we asked for, not the client
                            if not sent_any:
                                metrics.TIME_TO_FIRST_TOKEN.labels(cache_label).observe(
                                    time.perf_counter() - prepared.started
                                )
                                # Headers go out right before the first chunk: until then a proxy
                                # may still send the request to another Router.
                                await context.send_initial_metadata(_cache_metadata(prepared.decision))
                            sent_any = True
                            yield chunk
                    if not sent_any:
                        await context.send_initial_metadata(_cache_metadata(prepared.decision))
                    response = assembler.response(generation.model_id)
                    self._after_generation(api, request, prepared, assembler, response, generation)
                result = "ok"
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            if not isinstance(error, RouterError):  # a bug: still an error event, and the trace in the log
                log.exception("%s stream failed", api.name)
                error = _internal(error)
            result = error.error_code
            if not sent_any or not rest:
                # Native gRPC clients read the status, also after messages (a deadline is
                # DEADLINE_EXCEEDED, not a message and OK); REST clients got theirs with the
                # first message.
                await _abort(context, error)
            # REST, tokens already went out: end the stream with an error event, never a silent cut.
            broken = error if isinstance(error, StreamBroken) else StreamBroken(error.message)
            yield gateway.error_chunk(
                api.chunk_type, broken.message, type=broken.error_type, code=broken.error_code, param=broken.param
            )
        finally:
            metrics.REQUESTS.labels(api.name, cache_label, result).inc()
        if rest:
            yield gateway.stream_end(api.chunk_type)

    def _after_generation(
        self,
        api: GenerationApi,
        request: codec.GenerationRequest,
        prepared: Prepared,
        assembler: Any,
        response: Message,
        generation: Generation,
    ) -> None:
        usage = response.usage  # type: ignore[attr-defined]
        metrics.GENERATED_TOKENS.labels(generation.model_id).inc(usage.completion_tokens)
        metrics.PROMPT_TOKENS.labels(generation.model_id).inc(usage.prompt_tokens)
        load = self._table.find(generation.backend_id)
        backend = load.backend if load is not None else None
        fresh = same_weights(self._catalog.get(generation.model_id), backend)
        if not generation.stored and assembler.finished and fresh:
            ttl = request.cache.ttl_seconds if request.cache.HasField("ttl_seconds") else None
            generation.stored = self._cache.store_later(prepared.decision, response, generation.model_id, ttl)

    def _subscription(self, api: GenerationApi, request: codec.GenerationRequest, prepared: Prepared) -> Subscription:
        """The request's reader of a generation: the one started early, else a running identical one, else a new one."""
        early = prepared.take_early()
        if early is not None:
            return early
        decision = prepared.decision
        key = decision.scope.exact_key if decision.status == "miss" and decision.scope is not None else None
        return self._start_generation(api, request, prepared.route, key).join()

    def _start_generation(
        self, api: GenerationApi, request: codec.GenerationRequest, route: ModelRoute, key: str | None
    ) -> Generation:
        generation = self._coalescer.join_or_start(
            f"{api.name}:{key}" if key else None, lambda g: self._produce(api, request, route, g)
        )
        if generation.subscribers:
            metrics.COALESCED.inc()
        return generation

    async def _produce(
        self, api: GenerationApi, request: codec.GenerationRequest, route: ModelRoute, generation: Generation
    ) -> AsyncIterator[dict[str, Any]]:
        """Streams from a backend; before the first token a failure is retried on another one."""
        tried: set[str] = set()
        attempts = 0
        first_failure = 0.0
        prefix = affinity.prefix_key(request) if self._settings.balance == "prefix" else ""
        while True:
            # The `backend choice` span: from here (cold start and queue wait included) to a held slot.
            choosing, depth = time.time_ns(), self._table.queue_depth()
            if not self._table.can_serve(route.variant_ids):
                await self._ensure_backend(route)
            if tried and not self._table.has_ready(route.variant_ids, exclude=tried):
                tried.clear()  # every backend left was tried: try them again rather than wait for a new one
            metrics.QUEUE_DEPTH.set(self._table.queue_depth() + 1)
            scale_out = self._scale_out_later(route)
            try:
                async with self._table.lease(route.variant_ids, exclude=frozenset(tried), affinity=prefix) as lease:
                    if scale_out is not None:
                        scale_out.cancel()
                    metrics.QUEUE_DEPTH.set(self._table.queue_depth())
                    observe.record_backend_choice(choosing, route, lease, depth)
                    generation.model_id = lease.model_id
                    generation.backend_id = lease.load.key
                    metrics.VARIANT_CHOICE.labels(route.requested, lease.model_id).inc()
                    body = codec.backend_body(
                        request, backend_model=lease.backend_model, stream=True,
                        max_tokens_default=self._settings.default_max_tokens,
                    )
                    received = False
                    try:
                        events = self._llama.stream(lease.endpoint, api.path, body)
                        async with lease.unless_lost():
                            async for event in observe.traced_generation(api.name, lease, body, events):
                                received = True
                                yield event
                        return
                    except RouterError as error:
                        if received:
                            raise StreamBroken(f"the model backend failed mid-answer: {error.message}") from error
                        # Retries go on while the stack heals (a backend or the Supervisor restarting),
                        # bounded by the recovery wait, and at least `max_retries_before_first_token`.
                        first_failure = first_failure or time.monotonic()
                        healing = time.monotonic() - first_failure < self._settings.recovery_wait_seconds
                        if not error.retryable or (attempts >= self._settings.max_retries_before_first_token and not healing):
                            raise
                        attempts += 1
                        metrics.RETRIES.inc()
                        tried.add(lease.load.key)
                        self._table.avoid(lease.load.key)
                        log.warning("backend %s failed before the first token (%s); retrying", lease.load.key, error)
            finally:
                if scale_out is not None:
                    scale_out.cancel()
                metrics.QUEUE_DEPTH.set(self._table.queue_depth())
            if not self._table.has_ready(route.variant_ids):
                # Every replica failed: wait for the Supervisor to restart one (or start it ourselves).
                tried.clear()
                await asyncio.sleep(0.5)

    async def _ensure_backend(self, route: ModelRoute) -> None:
        """Asks a node's Supervisor to start the route's best variant; concurrent callers share one call."""
        await asyncio.shield(self._start_model(route.variant_ids[0]))

    def _start_model(self, model_id: str) -> asyncio.Task[None]:
        task = self._cold_starts.get(model_id)
        if task is None or task.done():
            task = asyncio.create_task(self._call_ensure(model_id), name=f"ensure-{model_id[:40]}")
            self._cold_starts[model_id] = task
        return task

    def _scale_out_later(self, route: ModelRoute) -> asyncio.TimerHandle | None:
        """When every slot of the route is busy, a request still waiting after `scale_out_after_seconds`
        starts the best variant that has no backend yet (a lighter one than those running)."""
        delay = self._settings.scale_out_after_seconds
        if route.pinned or delay <= 0 or len(route.variant_ids) < 2 or self._table.has_free_slot(route.variant_ids):
            return None
        idle = [m for m in route.variant_ids if not self._table.backends_of(m)]
        if not idle:
            return None

        def start() -> None:
            if not self._table.has_free_slot(route.variant_ids):
                log.info("every slot of %s stayed busy for %.0f s: starting %s", route.requested, delay, idle[0])
                task = self._start_model(idle[0])
                task.add_done_callback(_log_failure)

        return asyncio.get_running_loop().call_later(delay, start)

    async def _call_ensure(self, model_id: str) -> None:
        """EnsureBackend on the nodes that have the file (fewest backends first); a node that refuses
        (no room, unknown file) passes to the next; nodes that cannot be reached (restarting) are
        waited for, bounded by the recovery wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.recovery_wait_seconds
        delay = 0.1
        while True:
            refusal: grpc.aio.AioRpcError | None = None
            for node in self._nodes.candidates(model_id):
                try:
                    reply = await node.supervisor.EnsureBackend(
                        supervisor_service_pb2.EnsureBackendRequest(model=model_id),
                        timeout=self._settings.cold_start_timeout_seconds,
                    )
                except grpc.aio.AioRpcError as error:
                    if not _unreachable(node, error):
                        refusal = refusal if refusal is not None and error.code() == grpc.StatusCode.NOT_FOUND else error
                    continue
                self._table.add(reply.backend, node.key)
                return
            if refusal is not None and (refusal.code() != grpc.StatusCode.UNAVAILABLE or loop.time() >= deadline):
                if refusal.code() == grpc.StatusCode.NOT_FOUND:
                    raise ModelNotFound(f"The model `{model_id}` is unknown to the Supervisor.", param="model")
                raise ModelUnavailable(f"The model `{model_id}` cannot be started: {refusal.details()}", retry_after=2)
            if loop.time() >= deadline:
                raise ModelUnavailable(
                    f"The model `{model_id}` cannot be started: no node's Supervisor can be reached", retry_after=2
                )
            # A node that comes back may bring a READY backend in its watch before EnsureBackend answers.
            if self._table.has_ready((model_id,)):
                return
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


def _unreachable(node: Node, error: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the transport (no Supervisor answered), not a refusal the Supervisor sent."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and node.unreachable()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("starting a lighter variant failed: %s", task.exception())


# --- helpers -------------------------------------------------------------------------------------
def _cache_metadata(decision: CacheDecision) -> tuple[tuple[str, str], ...]:
    metadata = [(gateway.CACHE_HEADER, decision.status)]
    if decision.status == "hit":
        metadata.append((CACHE_KIND_HEADER, decision.kind))
        if decision.entry is not None:
            metadata.append((gateway.CACHE_ENTRY_HEADER, decision.entry.entry_id))
        if decision.kind == "semantic":
            metadata.append((gateway.SIMILARITY_HEADER, f"{decision.similarity:.4f}"))
    return tuple(metadata)


def _fresh(message: Message) -> Message:
    """A cached answer gets its own id and time, as any answer does."""
    prefix = "chatcmpl" if isinstance(message, pb.CreateChatCompletionResponse) else "cmpl"
    message.id = f"{prefix}-{secrets.token_hex(12)}"  # type: ignore[attr-defined]
    message.created = int(time.time())  # type: ignore[attr-defined]
    return message


def _when_done(context: grpc.aio.ServicerContext, callback: Callable[[], None]) -> None:
    """Calls `callback` when the RPC ends, however it ends (cancelled by the client included)."""
    add_done_callback = getattr(context, "add_done_callback", None)
    if add_done_callback is not None:
        add_done_callback(lambda _context: callback())


def _internal(error: Exception) -> RouterError:
    return RouterError(f"The Router failed unexpectedly ({type(error).__name__}); the error is in its log.")


async def _abort(context: grpc.aio.ServicerContext, error: RouterError) -> None:
    await gateway.abort_with_openai_error(
        context,
        error.grpc_code,
        error.message,
        type=error.error_type,
        code=error.error_code,
        param=error.param,
        retry_after=error.retry_after,
    )


def _remaining(context: grpc.aio.ServicerContext, default: float) -> float:
    remaining = context.time_remaining()
    return default if remaining is None else max(0.001, min(default, remaining))


@contextlib.asynccontextmanager
async def _deadline(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """The caller's gRPC deadline bounds all the work done for it, backends included."""
    remaining = context.time_remaining()
    if remaining is None:
        yield
        return
    try:
        async with asyncio.timeout(remaining):
            yield
    except TimeoutError:
        raise BackendTimeout(
            "the request's deadline passed before the answer was complete", code="deadline_exceeded"
        ) from None


def _embedding_inputs(request: pb.CreateEmbeddingRequest) -> list[str]:
    kind = request.input.WhichOneof("kind") if request.HasField("input") else None
    if kind == "string_value":
        texts = [request.input.string_value]
    elif kind == "list_value" and all(v.WhichOneof("kind") == "string_value" for v in request.input.list_value.values):
        texts = [v.string_value for v in request.input.list_value.values]
    elif kind == "list_value":
        raise InvalidRequest("token-id inputs are not supported; send text", param="input")
    else:
        raise InvalidRequest("`input` must be a string or a list of strings", param="input")
    if not texts:
        raise InvalidRequest("`input` must not be empty", param="input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"`input` has {len(texts)} items; the limit is {MAX_EMBEDDING_INPUTS}", param="input")
    return texts


def _shorten(vector: list[float], dimensions: int) -> list[float]:
    if not dimensions or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = sum(x * x for x in head) ** 0.5 or 1.0
    return [x / norm for x in head]
