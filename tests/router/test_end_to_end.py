"""The product end to end: clients → real Envoy → Router → Embedding, Cache (Redis Stack), llama-server.

Everything here goes through Envoy's public port of the session's `lmcluster up` (fixture `stack`,
tests/fixtures/stack.py): the official `openai` SDK (sync and async, stream and not, chat and
completions), raw HTTP for the headers and the cache extension, and a native gRPC client.
"""

from __future__ import annotations

import json

import grpc
import httpx
import openai
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2, router_service_pb2_grpc

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.router.end_to_end_support import (
    EMBEDDING_DIMENSIONS,
    HTTP_TIMEOUT,
    MODEL,
    chat_body,
    chat_text_of_events,
    client,
    nonce,
    post_until_hit,
    post_until_stored,
    sse_payloads,
    system_prompt,
)


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="not-needed", timeout=120.0, max_retries=0)


def async_sdk(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key="not-needed", timeout=120.0, max_retries=0)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt()}, {"role": "user", "content": question}]


# --- the openai SDK -------------------------------------------------------------------------------


def test_sdk_chat_completion(stack: Stack) -> None:
    with sdk(stack) as api:
        answer = api.chat.completions.create(model=MODEL, messages=messages("Name a colour."), max_tokens=12)
    assert answer.object == "chat.completion"
    assert answer.model == DEMO_MODEL_ID
    assert answer.id.startswith("chatcmpl")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_sdk_chat_stream(stack: Stack) -> None:
    with sdk(stack) as api:
        stream = api.chat.completions.create(
            model=MODEL, messages=messages("Count to five."), max_tokens=16, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert {c.model for c in chunks} == {DEMO_MODEL_ID}


def test_sdk_completion_and_its_stream(stack: Stack) -> None:
    prompt = f"[{nonce()}] The three primary colours are"
    with sdk(stack) as api:
        whole = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
        chunks = list(api.completions.create(model=MODEL, prompt=prompt + " red,", max_tokens=12, stream=True))
    assert whole.object == "text_completion"
    assert whole.model == DEMO_MODEL_ID
    assert whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


async def test_async_sdk_chat_and_completion_stream_and_not(stack: Stack) -> None:
    async with async_sdk(stack) as api:
        answer = await api.chat.completions.create(model=MODEL, messages=messages("Say hello."), max_tokens=10)
        stream = await api.chat.completions.create(
            model=MODEL, messages=messages("Say goodbye."), max_tokens=10, stream=True
        )
        chat_text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        completion = await api.completions.create(model=MODEL, prompt=f"[{nonce()}] Once upon a time", max_tokens=10)
        completion_stream = await api.completions.create(
            model=MODEL, prompt=f"[{nonce()}] In a galaxy far away", max_tokens=10, stream=True
        )
        completion_text = "".join([c.choices[0].text async for c in completion_stream if c.choices])
    assert answer.choices[0].message.content
    assert chat_text.strip()
    assert completion.choices[0].text
    assert completion_text.strip()


def test_sdk_models_and_embeddings(stack: Stack) -> None:
    with sdk(stack) as api:
        models = api.models.list()
        embeddings = api.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat", "a dog", "tax law"])
    ids = {model.id for model in models.data}
    assert {MODEL, DEMO_MODEL_ID} <= ids
    assert all(model.object == "model" for model in models.data)
    assert len(embeddings.data) == 3
    assert [item.index for item in embeddings.data] == [0, 1, 2]
    assert all(len(item.embedding) == EMBEDDING_DIMENSIONS for item in embeddings.data)
    assert embeddings.usage.prompt_tokens > 0


def test_sdk_error_is_an_openai_error(stack: Stack) -> None:
    with sdk(stack) as api:
        try:
            api.chat.completions.create(model="no-such-model", messages=messages("Hi"))
        except openai.NotFoundError as error:
            assert error.status_code == 404
            assert error.code == "model_not_found"
        else:
            raise AssertionError("an unknown model was answered")


# --- raw HTTP: the cache and its headers ------------------------------------------------------------


def test_identical_repeat_is_an_exact_hit_with_the_same_answer_and_usage(stack: Stack) -> None:
    body = chat_body("What is the capital of France?", system=system_prompt(), max_tokens=20)
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=body)
        hit = post_until_hit(http, "/v1/chat/completions", body)
    assert first.status_code == 200, first.text
    assert first.headers["x-lmc-cache"] == "miss"
    assert "x-lmc-similarity" not in first.headers
    assert hit.headers["x-lmc-cache-kind"] == "exact"
    answer, cached = first.json(), hit.json()
    assert cached["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
    assert cached["id"] != answer["id"]  # a cached answer is a new answer
    assert cached["model"] == DEMO_MODEL_ID
    assert cached["usage"] == answer["usage"]
    assert cached["usage"]["prompt_tokens"] > 0 and cached["usage"]["completion_tokens"] > 0


def test_paraphrase_is_a_semantic_hit_with_its_similarity(stack: Stack) -> None:
    system = system_prompt()
    original = chat_body("How do I reverse a list in Python?", system=system, max_tokens=24)
    # The same question with its phrase fronted: verified equal, found by the embedding.
    paraphrase = chat_body("In Python, how can I reverse a list?", system=system, max_tokens=24)
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=original)
        assert first.headers["x-lmc-cache"] == "miss"
        post_until_stored(stack, http, "/v1/chat/completions", original)
        semantic = http.post("/v1/chat/completions", json=paraphrase)
    assert semantic.status_code == 200, semantic.text
    assert semantic.headers["x-lmc-cache"] == "hit"
    assert semantic.headers["x-lmc-cache-kind"] == "semantic"
    similarity = float(semantic.headers["x-lmc-similarity"])
    assert 0.9 <= similarity < 1.0
    assert semantic.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert semantic.json()["usage"]["total_tokens"] > 0


def test_same_question_under_another_system_prompt_or_document_is_a_miss(stack: Stack) -> None:
    question = "According to the document, when does the warranty end?"
    tag = nonce()
    doc_a = f"Document {tag}: The warranty of the X100 ends after two years."
    doc_b = f"Document {tag}: The warranty of the X100 ends after five years."

    def rag(system: str, document: str) -> dict:
        body = chat_body(question, system=system, max_tokens=16)
        body["messages"].insert(1, {"role": "user", "content": document})
        body["messages"].insert(2, {"role": "assistant", "content": "I have read the document."})
        return body

    with client(stack) as http:
        base = rag(system_prompt(tag), doc_a)
        assert http.post("/v1/chat/completions", json=base).headers["x-lmc-cache"] == "miss"
        post_until_hit(http, "/v1/chat/completions", base)
        other_system = http.post("/v1/chat/completions", json=rag(system_prompt(tag) + " Answer in French.", doc_a))
        other_document = http.post("/v1/chat/completions", json=rag(system_prompt(tag), doc_b))
        again = http.post("/v1/chat/completions", json=base)
    assert other_system.status_code == other_document.status_code == 200
    assert other_system.headers["x-lmc-cache"] == "miss"
    assert other_document.headers["x-lmc-cache"] == "miss"
    assert again.headers["x-lmc-cache"] == "hit"


def test_a_stream_is_replayed_from_the_cache_as_a_proper_sse_stream(stack: Stack) -> None:
    body = chat_body("Name three fruits.", system=system_prompt(), max_tokens=24)
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=body)
        assert first.headers["x-lmc-cache"] == "miss"
        post_until_hit(http, "/v1/chat/completions", body)
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=stream_body) as response:
            assert response.status_code == 200
            headers = response.headers
            payloads = sse_payloads(response.iter_lines())
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-lmc-cache"] == "hit"
    assert headers["cache-control"] == "no-cache"
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    events = [json.loads(p) for p in payloads[:-1]]
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert len(events) >= 3  # role, content pieces, finish, usage
    assert chat_text_of_events(payloads) == first.json()["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == first.json()["usage"]
    assert any(c.get("finish_reason") for e in events for c in e.get("choices", []))


def test_a_live_stream_ends_with_done_and_is_then_a_hit(stack: Stack) -> None:
    body = chat_body("Name a planet.", system=system_prompt(), max_tokens=12, stream=True)
    with client(stack) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["x-lmc-cache"] == "miss"
            payloads = sse_payloads(response.iter_lines())
        replay = post_until_hit(http, "/v1/chat/completions", {**body, "stream": False})
    assert payloads[-1] == "[DONE]"
    assert chat_text_of_events(payloads) == replay.json()["choices"][0]["message"]["content"]


def test_cache_extension_skip_lookup_skip_store_and_scope(stack: Stack) -> None:
    system = system_prompt()
    with client(stack) as http:
        # skip_store: answered, never stored.
        unstored = chat_body("What colour is the sky?", system=system, cache={"skip_store": True})
        assert http.post("/v1/chat/completions", json=unstored).headers["x-lmc-cache"] == "miss"
        plain = chat_body("What colour is the sky?", system=system)
        assert http.post("/v1/chat/completions", json=plain).headers["x-lmc-cache"] == "miss"
        # That plain request was stored; skip_lookup bypasses it.
        post_until_hit(http, "/v1/chat/completions", plain)
        bypass = http.post("/v1/chat/completions", json={**plain, "cache": {"skip_lookup": True}})
        assert bypass.status_code == 200
        assert bypass.headers["x-lmc-cache"] == "bypass"
        assert bypass.json()["choices"][0]["message"]["content"]
        # An explicit scope is a namespace of its own.
        scope_a, scope_b = f"tenant-a-{nonce()}", f"tenant-b-{nonce()}"
        in_a = chat_body("What colour is grass?", system=system, cache={"scope": scope_a})
        in_b = chat_body("What colour is grass?", system=system, cache={"scope": scope_b})
        assert http.post("/v1/chat/completions", json=in_a).headers["x-lmc-cache"] == "miss"
        post_until_hit(http, "/v1/chat/completions", in_a)
        other_scope = http.post("/v1/chat/completions", json=in_b)
        no_scope = http.post("/v1/chat/completions", json=chat_body("What colour is grass?", system=system))
    assert other_scope.headers["x-lmc-cache"] == "miss"
    assert no_scope.headers["x-lmc-cache"] == "miss"


def test_completions_are_cached_too(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": f"[{nonce()}] Water boils at", "max_tokens": 8, "temperature": 0}
    with client(stack) as http:
        first = http.post("/v1/completions", json=body)
        hit = post_until_hit(http, "/v1/completions", body)
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            streamed_headers = response.headers
            payloads = sse_payloads(response.iter_lines())
    assert first.headers["x-lmc-cache"] == "miss"
    assert hit.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert hit.json()["usage"]["completion_tokens"] > 0
    assert streamed_headers["x-lmc-cache"] == "hit"
    assert payloads[-1] == "[DONE]"
    text = "".join(c["text"] for p in payloads[:-1] for c in json.loads(p)["choices"])
    assert text == first.json()["choices"][0]["text"]


def test_models_and_embeddings_over_raw_http(stack: Stack) -> None:
    with client(stack) as http:
        models = http.get("/v1/models")
        embeddings = http.post("/v1/embeddings", json={"input": "hello world", "model": "all-MiniLM-L6-v2"})
    assert models.status_code == 200
    listed = {card["id"]: card for card in models.json()["data"]}
    assert models.json()["object"] == "list"
    assert listed[MODEL]["model_id"] == DEMO_MODEL_ID
    assert listed[MODEL]["quantization"] == "Q4_1"
    assert listed[MODEL]["context_length"] > 0
    assert embeddings.status_code == 200
    data = embeddings.json()["data"]
    assert len(data) == 1 and len(data[0]["embedding"]) == EMBEDDING_DIMENSIONS
    assert abs(sum(x * x for x in data[0]["embedding"]) - 1.0) < 1e-3


def test_health_endpoints(stack: Stack) -> None:
    assert httpx.get(f"{stack.http_url}/healthz", timeout=HTTP_TIMEOUT).status_code == 200
    assert httpx.get(f"{stack.http_url}/readyz", timeout=HTTP_TIMEOUT).status_code == 200


# --- native gRPC through Envoy's port ------------------------------------------------------------------


def grpc_chat(question: str, **fields: object) -> oa.CreateChatCompletionRequest:
    return oa.CreateChatCompletionRequest(
        model=MODEL,
        messages=[
            oa.ChatMessage(role="system", content=struct_pb2.Value(string_value=system_prompt())),
            oa.ChatMessage(role="user", content=struct_pb2.Value(string_value=question)),
        ],
        max_tokens=12,
        **fields,  # type: ignore[arg-type]
    )


async def test_native_grpc_client_through_envoy(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        call = stub.CreateChatCompletion(grpc_chat("Name an animal."), timeout=120)
        reply = await call
        metadata = dict(await call.initial_metadata())
        stream = stub.StreamChatCompletion(grpc_chat("Name a country."), timeout=120)
        chunks = [chunk async for chunk in stream]
        stream_code = await stream.code()
        models = await stub.ListModels(router_service_pb2.ListModelsRequest(), timeout=30)
        embedding = await stub.CreateEmbedding(
            oa.CreateEmbeddingRequest(input=struct_pb2.Value(string_value="hi"), model="all-MiniLM-L6-v2"), timeout=30
        )
        with_error = stub.CreateChatCompletion(
            oa.CreateChatCompletionRequest(model="no-such-model", messages=grpc_chat("x").messages), timeout=30
        )
        try:
            await with_error
        except grpc.aio.AioRpcError as error:
            missing = error
        else:
            raise AssertionError("an unknown model was answered")
    assert reply.model == DEMO_MODEL_ID
    assert reply.choices[0].message.content
    assert reply.usage.total_tokens > 0
    assert metadata["x-lmc-cache"] == "miss"
    assert stream_code == grpc.StatusCode.OK
    assert chunks and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices).strip()
    assert MODEL in {card.id for card in models.data}
    assert len(embedding.data[0].embedding.list_value.values) == EMBEDDING_DIMENSIONS
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    body = json.loads(dict(missing.trailing_metadata() or ())["x-lmc-error"])
    assert body["error"]["code"] == "model_not_found"
