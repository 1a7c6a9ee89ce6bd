"""A client of its own process: sequential hits, one every 50 ms per kind, until stdin closes.

bench_latency runs it beside its 16-client load, so that the hits' latency is read by a client
that does not share an event loop (and a GIL) with the 16 clients parsing their streams. Three
kinds run side by side: exact hits over REST and over native gRPC (both through Envoy), and
semantic hits over REST (a rewording of a stored question, which the Cache verifies and serves;
a semantic hit stores nothing, and the rewording asks for no store in case of a miss, so every one
is a semantic lookup). It prints one JSON object: the
seconds of each hit, by kind, and every reply that was not the expected hit (a miss: a lookup
that ran past the Router's budget).
Run: `python -m tests.bench.hit_probe HTTP_URL GRPC_TARGET EXACT_BODY_JSON SEMANTIC_BODY_JSON`.
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


def rest(url: str, body: dict, done: threading.Event, out: list[float], problems: list[str], kind: str) -> None:
    with httpx.Client(timeout=30.0) as http:
        while not done.is_set():
            started = time.perf_counter()
            reply = http.post(url, json=body)
            elapsed = time.perf_counter() - started
            got = (reply.status_code, reply.headers.get("x-lmc-cache"), reply.headers.get("x-lmc-cache-kind"))
            if got == (200, "hit", kind):
                out.append(elapsed)
            elif got[:2] == (200, "miss"):  # the lookup ran past its budget: a generation answered
                problems.append(f"miss: REST {kind}")
            else:
                problems.append(f"REST {kind}: {got} {reply.text[:200]}")
            time.sleep(PAUSE_SECONDS)


def native(target: str, body: dict, done: threading.Event, out: list[float], problems: list[str]) -> None:
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
            elapsed = time.perf_counter() - started
            metadata = dict(call.initial_metadata())
            got = (metadata.get("x-lmc-cache"), metadata.get("x-lmc-cache-kind"))
            if got == ("hit", "exact"):
                out.append(elapsed)
            else:
                problems.append(f"gRPC exact: {got}")
            time.sleep(PAUSE_SECONDS)


def main() -> None:
    url, target, body, reworded = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    done = threading.Event()
    times: dict[str, list[float]] = {
        "exact, REST through Envoy": [],
        "exact, native gRPC through Envoy": [],
        "semantic, REST through Envoy": [],
    }
    problems: list[str] = []
    workers = [
        threading.Thread(target=rest, args=(url, body, done, times["exact, REST through Envoy"], problems, "exact")),
        threading.Thread(target=native, args=(target, body, done, times["exact, native gRPC through Envoy"], problems)),
        threading.Thread(
            target=rest, args=(url, reworded, done, times["semantic, REST through Envoy"], problems, "semantic")
        ),
    ]
    for worker in workers:
        worker.start()
    sys.stdin.read()  # until the benchmark closes it
    done.set()
    for worker in workers:
        worker.join()
    print(json.dumps({"times": times, "problems": problems}))


if __name__ == "__main__":
    main()
