"""cache_scope(): what the scope includes and leaves out, exact keys, and the cacheability policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.json_format import ParseDict
from lmcluster.registry.v1 import registry_pb2
from lmcluster.router.v1 import openai_pb2
from lmcluster.supervisor.v1 import supervisor_pb2

from services.common.cache_scope import cache_scope, normalize_prompt, weights_identity
from services.launcher.envoy_config import render_envoy_config
from services.router.caching import CacheTenancy, same_weights, tenant_of
from tests.fixtures.parts import DESCRIPTOR_SET, ENVOY_TEMPLATE


def chat(**fields: Any) -> openai_pb2.CreateChatCompletionRequest:
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        **fields,
    }
    return ParseDict(body, openai_pb2.CreateChatCompletionRequest())


def completion(**fields: Any) -> openai_pb2.CreateCompletionRequest:
    return ParseDict(
        {"model": "demo", "prompt": "Once upon a time", **fields}, openai_pb2.CreateCompletionRequest()
    )


def test_a_plain_chat_is_cacheable_with_hex_scope_and_exact_key() -> None:
    scoped = cache_scope(chat())
    assert scoped.cacheable and scoped.lookup and scoped.store and not scoped.reason
    assert len(scoped.scope) == 64 and int(scoped.scope, 16) >= 0
    assert len(scoped.exact_key) == 64 and scoped.exact_key != scoped.scope
    assert scoped.prompt == "What is 2+2?"


def test_the_final_user_wording_changes_the_exact_key_but_not_the_scope() -> None:
    one = cache_scope(chat())
    other = cache_scope(chat(messages=[{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": "How much is 2 plus 2?"}]))  # fmt: skip
    assert one.scope == other.scope and one.exact_key != other.exact_key


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other-model"},
        {"messages": [{"role": "system", "content": "You are verbose."}, {"role": "user", "content": "What is 2+2?"}]},
        {"messages": [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "What is 2+2?"}]},
        {"messages": [{"role": "user", "content": "What is 2+2?"}]},
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Use base 3."},
                      {"role": "assistant", "content": "OK."}, {"role": "user", "content": "What is 2+2?"}]},
        {"messages": [{"role": "system", "content": "You are terse.\n\nDocument: 2+2 is 5 here."},
                      {"role": "user", "content": "What is 2+2?"}]},
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                                   {"type": "image_url", "image_url": {"url": "data:x"}}]}]},
        {"temperature": 0.0}, {"temperature": 0.7}, {"top_p": 0.5}, {"top_k": 5}, {"min_p": 0.1},
        {"max_tokens": 16}, {"max_completion_tokens": 16}, {"stop": ["\n"]}, {"seed": 7},
        {"presence_penalty": 1.0}, {"frequency_penalty": 1.0}, {"logit_bias": {"50256": -100}},
        {"response_format": {"type": "json_object"}}, {"logprobs": True}, {"top_logprobs": 2},
        {"cache": {"scope": "tenant-a"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
    ],
)  # fmt: skip
def test_everything_that_changes_the_answer_changes_the_scope(change: dict[str, Any]) -> None:
    base = cache_scope(chat())
    changed = cache_scope(chat(**change))
    assert changed.cacheable, changed.reason
    assert changed.scope != base.scope


@pytest.mark.parametrize(
    "change",
    [
        {"stream": True}, {"stream_options": {"include_usage": True}}, {"n": 1}, {"user": "alice"},
        {"cache": {"skip_store": True, "threshold": 0.9, "ttl_seconds": 60}},
    ],
)  # fmt: skip
def test_what_does_not_change_the_answer_leaves_the_scope_alone(change: dict[str, Any]) -> None:
    assert cache_scope(chat(**change)).scope == cache_scope(chat()).scope
    assert cache_scope(chat(**change)).exact_key == cache_scope(chat()).exact_key


def test_json_objects_are_canonical_and_stop_is_a_set() -> None:
    one = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": 1, "b": 2}}},
               stop=["END", "\n"])  # fmt: skip
    two = chat(response_format={"json_schema": {"schema": {"b": 2, "a": 1}, "name": "x"}, "type": "json_schema"},
               stop=["\n", "END", "END"])  # fmt: skip
    assert cache_scope(one).scope == cache_scope(two).scope
    assert cache_scope(chat(stop="END")).scope == cache_scope(chat(stop=["END"])).scope


def test_max_completion_tokens_and_max_tokens_are_one_limit() -> None:
    assert cache_scope(chat(max_tokens=32)).scope == cache_scope(chat(max_completion_tokens=32)).scope


def test_text_parts_and_a_string_are_the_same_final_message() -> None:
    parts = chat(messages=[{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])  # fmt: skip
    assert cache_scope(parts).scope == cache_scope(chat()).scope
    assert cache_scope(parts).exact_key == cache_scope(chat()).exact_key


def test_the_exact_key_is_the_canonical_prompt_and_code_stays_verbatim() -> None:
    def key(text: str) -> str:
        return cache_scope(chat(messages=[{"role": "user", "content": text}])).exact_key

    assert key("What is 2+2?") == key("  What is 2+2?\r\n") == key("what is 2+2") == key("Hi! What's 2+2?")
    assert key("Can you explain TCP?") == key("Please explain TCP.")
    assert key("What is 2+2?") != key("What is 2+3?")
    assert key("Who did Acme sue?") != key("Who sued Acme?")
    assert key("def f():\n    return 1") != key("def f():\n  return 1")
    assert key("Why does `Foo()` fail?") != key("Why does `foo()` fail?")
    assert normalize_prompt("a\r\nb ") == "a\nb"
    assert key("café") == key("cafe\u0301")  # Unicode NFC
    # The prompt the cache embeds and verifies is the whole message, as written.
    assert cache_scope(chat(messages=[{"role": "user", "content": " Hi! What's 2+2? "}])).prompt == "Hi! What's 2+2?"


def fingerprinted(model_id: str, header: str, sha256: str = "") -> registry_pb2.Model:
    return registry_pb2.Model(
        id=model_id,
        fingerprint=registry_pb2.Fingerprint(size_bytes=100, mtime_ns=5, header_sha256=header, sha256=sha256),
    )


def test_the_weights_are_in_the_scope() -> None:
    request = chat()
    old = weights_identity([fingerprinted("m/q4", "aaa")])
    new = weights_identity([fingerprinted("m/q4", "bbb")])
    assert old != new
    assert cache_scope(request, model="m", weights=old).scope != cache_scope(request, model="m", weights=new).scope
    assert cache_scope(request, model="m", weights=old).scope == cache_scope(request, model="m", weights=old).scope
    # Variants in any order; the full content hash wins when the Registry has one.
    both = [fingerprinted("m/q4", "aaa"), fingerprinted("m/q8", "ccc")]
    assert weights_identity(both) == weights_identity(list(reversed(both)))
    assert "ffff" in weights_identity([fingerprinted("m/q4", "aaa", sha256="ffff")])


def test_each_tenant_has_its_own_scope_and_never_the_key_itself() -> None:
    request = chat()
    first = cache_scope(request, tenant="key-0a1b")
    assert first.scope != cache_scope(request, tenant="key-9f8e").scope
    assert first.scope != cache_scope(request).scope
    assert first.scope == cache_scope(request, tenant="key-0a1b").scope


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (chat(n=2), "n = 2"),
        (chat(tools=[{"type": "function", "function": {"name": "get_weather"}}]), "tools"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"), "tools"),
        (chat(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]), "assistant"),
        (chat(messages=[{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}]), "tool"),
        (chat(messages=[{"role": "user", "content": "   "}]), "no text"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "no text"),
        (chat(messages=[]), "no messages"),
        (completion(prompt=[1, 2, 3]), "not one string"),
        (completion(prompt=["a", "b"]), "not one string"),
        (completion(best_of=3), "best_of"),
        (completion(n=4), "n = 4"),
    ],
)  # fmt: skip
def test_uncacheable_requests_say_why(request_: Any, reason: str) -> None:
    scoped = cache_scope(request_)
    assert not scoped.cacheable and not scoped.lookup and not scoped.store
    assert reason in scoped.reason
    assert scoped.scope == "" and scoped.exact_key == ""


def test_completions_are_scoped_like_chats() -> None:
    base = cache_scope(completion())
    assert base.cacheable and base.prompt == "Once upon a time"
    assert cache_scope(completion(prompt=["Once upon a time"])).exact_key == base.exact_key
    assert cache_scope(completion(suffix=" The end.")).scope != base.scope
    assert cache_scope(completion(echo=True)).scope != base.scope
    assert cache_scope(completion(temperature=0.0)).scope != base.scope
    assert cache_scope(completion(stream=True)).scope == base.scope
    # A chat and a completion with the same text never share entries.
    assert cache_scope(chat(messages=[{"role": "user", "content": "Once upon a time"}])).scope != base.scope


def test_cache_options_pass_through() -> None:
    scoped = cache_scope(chat(cache={"skip_lookup": True, "threshold": 0.9, "ttl_seconds": 120}))
    assert scoped.cacheable and not scoped.lookup and scoped.store
    assert scoped.threshold == pytest.approx(0.9) and scoped.ttl_seconds == 120
    assert not cache_scope(chat(cache={"skip_store": True})).store


def test_the_router_may_name_the_resolved_model() -> None:
    request = chat(model="smollm")
    assert (
        cache_scope(request, model="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/Q4_1").scope
        != cache_scope(request).scope
    )


def test_keys_share_the_cache_only_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMC_CACHE_SHARED_ACROSS_KEYS", raising=False)
    assert not CacheTenancy().shared_across_keys
    monkeypatch.setenv("LMC_CACHE_SHARED_ACROSS_KEYS", "true")
    assert CacheTenancy().shared_across_keys
    assert tenant_of((("lmc-client", "key-0a1b"), ("user-agent", "x"))) == "key-0a1b"
    assert tenant_of(()) == tenant_of(None) == ""


def test_envoy_forwards_a_hash_of_the_key_never_the_key(tmp_path: Path) -> None:
    keys = ["sk-alpha-123", "sk-beta-456"]
    rendered = render_envoy_config(ENVOY_TEMPLATE, tmp_path / "envoy.yaml", http_port=0, admin_port=0,
                                   descriptor_set=DESCRIPTOR_SET, api_keys=keys)  # fmt: skip
    config = yaml.safe_load(rendered.read_text())
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    auth = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.api_key_auth")
    settings = auth["typed_config"]
    assert settings["forwarding"] == {"hide_credentials": True, "header": "lmc-client"}
    clients = [credential["client"] for credential in settings["credentials"]]
    assert len(set(clients)) == 2 and all(key not in client for key in keys for client in clients)
    # A key's client id does not depend on the other keys: removing one never hands its entries over.
    alone = render_envoy_config(ENVOY_TEMPLATE, tmp_path / "alone.yaml", http_port=0, admin_port=0,
                                descriptor_set=DESCRIPTOR_SET, api_keys=keys[1:])  # fmt: skip
    assert clients[1] in alone.read_text()


def test_only_a_backend_on_the_listed_file_has_its_answers_cached() -> None:
    model = fingerprinted("m/q4", "new-header")
    assert same_weights(model, supervisor_pb2.Backend(id="b", model_fingerprint="new-header"))
    # The old backend still answering while the new file loads: not cached under the new scope.
    assert not same_weights(model, supervisor_pb2.Backend(id="b", model_fingerprint="old-header"))
    assert not same_weights(model, None) and not same_weights(None, supervisor_pb2.Backend(id="b"))
