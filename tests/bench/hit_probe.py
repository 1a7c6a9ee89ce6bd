"""A client of its own process: sequential exact hits, one every 50 ms, until stdin closes.

bench_latency runs it beside its 16-client load, so that the hits' latency is read by a client
that does not share an event loop (and a GIL) with the 16 clients parsing their streams. It prints
one JSON object: the seconds of each hit, by client kind (REST through Envoy, native gRPC through
Envoy). Run: `python -m tests.bench.hit_probe HTTP_URL GRPC_TARGET BODY_JSON`.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc
import httpx
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc

PAUSE_SECONDS = 0.05


def rest(url: str, body: dict, done: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30.0) as http:
        while not done.is_set():
            started = time.perf_counter()
            reply = http.post(url, json=body)
            out.append(time.perf_counter() - started)
            assert reply.status_code == 200 and reply.headers["x-lmc-cache"] == "hit", reply.text
            time.sleep(PAUSE_SECONDS)


def native(target: str, body: dict, done: threading.Event, out: list[float]) -> None:
    request = oa.CreateChatCompletionRequest(
        model=body["model"],
        messages=[oa.ChatMessage(role=m["role"], content=struct_pb2.Value(string_value=m["content"])) for m in body["messages"]],
        max_tokens=body["max_tokens"],
        temperature=0,
    )
    with grpc.insecure_channel(target) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        while not done.is_set():
            started = time.perf_counter()
            _reply, call = stub.CreateChatCompletion.with_call(request, timeout=30)
            out.append(time.perf_counter() - started)
            assert dict(call.initial_metadata()).get("x-lmc-cache") == "hit"
            time.sleep(PAUSE_SECONDS)


def main() -> None:
    url, target, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    done = threading.Event()
    found: dict[str, list[float]] = {"REST through Envoy": [], "native gRPC through Envoy": []}
    workers = [
        threading.Thread(target=rest, args=(url, body, done, found["REST through Envoy"])),
        threading.Thread(target=native, args=(target, body, done, found["native gRPC through Envoy"])),
    ]
    for worker in workers:
        worker.start()
    sys.stdin.read()  # until the benchmark closes it
    done.set()
    for worker in workers:
        worker.join()
    print(json.dumps(found))


if __name__ == "__main__":
    main()
