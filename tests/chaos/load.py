"""Concurrent clients through Envoy, the way users reach lmcluster, recording every request's fate.

Each client is a thread looping over one kind of call: REST unary, REST streamed (server-sent
events), native gRPC unary and native gRPC streamed, all to Envoy's public port. Most questions are
new (they reach a model); a quarter repeat a small set (they exercise the cache). Every request is
recorded with when it started and ended, whether the answer had begun (streams only: the Router's
headers or a chunk had arrived) and, when it failed, why. Nothing is retried except a connection that nobody
accepted (Envoy not listening: the request never reached the product): REST clients try the
connection again, as the openai SDK does (those retries are counted apart), and gRPC calls are
made with `wait_for_ready`, which waits for the channel to connect instead of failing at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import httpx
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc

from services.common.gateway import CACHE_HEADER
from tests.fixtures.stack import Stack

KINDS = ("rest", "rest-stream", "grpc", "grpc-stream")
ANSWER_TOKENS = 6
# Generous: on two shared cores a queued 6-token answer can wait a minute; a bound, not a target.
REQUEST_TIMEOUT = 300.0
CONNECT_RETRIES = 3
REPEATED = [f"Name one {thing}." for thing in ("colour", "fruit", "planet", "river", "animal")]


def chat_body(model: str, system: str, question: str, *, stream: bool = False) -> dict[str, object]:
    """A short, deterministic chat request (its system prompt gives it a cache scope of its own)."""
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": ANSWER_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


@dataclass(frozen=True)
class Outcome:
    kind: str
    started: float
    ended: float
    ok: bool
    # The answer had begun before it failed: the Router's response headers (sent with its first
    # chunk) or a chunk had reached the client. From then on no proxy can send the request again.
    streaming: bool = False
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    connect_retries: int

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    def failed_before_streaming(self) -> list[Outcome]:
        return [o for o in self.failed if not o.streaming]

    def p99_ms(self) -> float:
        latencies = sorted(o.seconds for o in self.ok)
        if not latencies:
            return 0.0
        return 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]

    def in_flight_at(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started <= moment < o.ended]

    def describe(self, limit: int = 8) -> str:
        kinds = {kind: sum(1 for o in self.outcomes if o.kind == kind) for kind in KINDS}
        lines = [f"{self.requests} requests {kinds}, {len(self.failed)} failed:"]
        lines += [f"  {o.kind} after {o.seconds:.2f} s (streaming={o.streaming}): {o.error}" for o in self.failed[:limit]]
        return "\n".join(lines)


@dataclass
class Load:
    """`with Load(stack, model) as load:` runs the clients until the block ends; `load.result`."""

    stack: Stack
    model: str
    clients_per_kind: int = 2
    outcomes: list[Outcome] = field(default_factory=list)
    connect_retries: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _tag: str = field(default_factory=lambda: secrets.token_hex(4))

    def __enter__(self) -> Load:
        for kind, number in itertools.product(KINDS, range(self.clients_per_kind)):
            thread = threading.Thread(target=self._client, args=(kind, number), name=f"load-{kind}-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 10)

    @property
    def result(self) -> LoadResult:
        with self._lock:
            return LoadResult(list(self.outcomes), self.connect_retries)

    def successes_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.ok and o.started >= moment)

    def wait_for_successes(self, count: int, since: float, timeout: float = 180.0) -> None:
        """Blocks until `count` requests that started after `since` succeeded (the load is flowing)."""
        deadline = time.monotonic() + timeout
        while self.successes_since(since) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} successful requests in {timeout:.0f} s\n{self.result.describe()}")
            time.sleep(0.1)

    # --- the clients ---------------------------------------------------------------------------
    def _question(self, rng: random.Random) -> str:
        if rng.random() < 0.25:
            return rng.choice(REPEATED)
        return f"Reply with one word about {secrets.token_hex(3)}."

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _client(self, kind: str, number: int) -> None:
        rng = random.Random(f"{self._tag}{kind}{number}")
        system = f"You are terse. Load {self._tag}."
        with contextlib.ExitStack() as stack:
            http = stack.enter_context(httpx.Client(base_url=self.stack.http_url, timeout=REQUEST_TIMEOUT))
            channel = stack.enter_context(grpc.insecure_channel(self.stack.grpc_target))
            router = router_service_pb2_grpc.RouterServiceStub(channel)
            while not self._stop.is_set():
                question = self._question(rng)
                started = time.monotonic()
                try:
                    if kind == "rest":
                        streaming, error = False, self._rest(http, system, question)
                    elif kind == "rest-stream":
                        streaming, error = self._rest_stream(http, system, question)
                    elif kind == "grpc":
                        streaming, error = False, self._grpc(router, system, question)
                    else:
                        streaming, error = self._grpc_stream(router, system, question)
                except Exception as exc:  # a failure of the request, whatever its kind
                    streaming, error = False, f"{type(exc).__name__}: {exc}"
                self._record(Outcome(kind, started, time.monotonic(), not error, streaming, error))

    def _post(self, http: httpx.Client, body: dict[str, object]) -> contextlib.AbstractContextManager[httpx.Response]:
        """A streamed POST; a connection Envoy refused (nothing listening) is tried again."""
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                response = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
                return contextlib.closing(response)  # type: ignore[return-value]
            except httpx.ConnectError:
                if attempt == CONNECT_RETRIES:
                    raise
                with self._lock:
                    self.connect_retries += 1
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _rest(self, http: httpx.Client, system: str, question: str) -> str:
        with self._post(http, chat_body(self.model, system, question)) as response:
            response.read()
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:300]}"
            answer = response.json()
        choices = answer.get("choices") or []
        if not choices or choices[0].get("finish_reason") is None:
            return f"HTTP 200 without a finished choice: {json.dumps(answer)[:300]}"
        return ""

    def _rest_stream(self, http: httpx.Client, system: str, question: str) -> tuple[bool, str]:
        streaming = finished = done = False
        with self._post(http, chat_body(self.model, system, question, stream=True)) as response:
            if response.status_code != 200:
                response.read()
                return False, f"HTTP {response.status_code}: {response.text[:300]}"
            streaming = CACHE_HEADER in response.headers
            try:
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        return streaming, f"error event: {event['error']}"
                    for choice in event.get("choices", []):
                        streaming = True
                        finished |= choice.get("finish_reason") is not None
            except httpx.HTTPError as error:  # the body was cut: say whether the answer had begun
                return streaming, f"{type(error).__name__}: {error}"
        if not (done and finished):
            return streaming, f"stream ended without a finish_reason and [DONE] (done={done})"
        return streaming, ""

    def _request(self, system: str, question: str) -> oa.CreateChatCompletionRequest:
        return oa.CreateChatCompletionRequest(
            model=self.model,
            messages=[
                oa.ChatMessage(role="system", content=struct_pb2.Value(string_value=system)),
                oa.ChatMessage(role="user", content=struct_pb2.Value(string_value=question)),
            ],
            max_tokens=ANSWER_TOKENS,
            temperature=0,
        )

    def _grpc(self, router: router_service_pb2_grpc.RouterServiceStub, system: str, question: str) -> str:
        try:
            answer = router.CreateChatCompletion(
                self._request(system, question), timeout=REQUEST_TIMEOUT, wait_for_ready=True
            )
        except grpc.RpcError as error:
            return f"gRPC {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
        if not answer.choices or not answer.choices[0].finish_reason:
            return "gRPC answer without a finished choice"
        return ""

    def _grpc_stream(self, router: router_service_pb2_grpc.RouterServiceStub, system: str, question: str) -> tuple[bool, str]:
        streaming = finished = False
        try:
            call = router.StreamChatCompletion(self._request(system, question), timeout=REQUEST_TIMEOUT, wait_for_ready=True)
            streaming = any(key == CACHE_HEADER for key, _ in call.initial_metadata() or ())
            for chunk in _chunks(call):
                for choice in chunk.choices:
                    streaming = True
                    finished |= bool(choice.finish_reason)
        except grpc.RpcError as error:
            return streaming, f"gRPC {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
        return streaming, "" if finished else "gRPC stream ended without a finish_reason"


def _chunks(call: Iterator[oa.CreateChatCompletionStreamResponse]) -> Iterator[oa.CreateChatCompletionStreamResponse]:
    yield from call
