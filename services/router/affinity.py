"""Which requests should meet on the same replica: those whose prompts start the same way.

llama-server keeps the KV cache of earlier prompts (per slot, and in its host prompt cache) and
evaluates only the tokens after the longest prefix it has seen. A chat's prefix is everything
before its last message (system prompt, documents, earlier turns); a lone message is its own
prefix, so a repeated question lands where it was answered. A text completion's prefix is the
first `TEXT_PREFIX_CHARS` of its prompt, where documents and instructions usually come first.
"""

from __future__ import annotations

import hashlib

from lmcluster.router.v1 import openai_pb2 as pb

from services.router.codec import GenerationRequest

TEXT_PREFIX_CHARS = 1024


def prefix_key(request: GenerationRequest) -> str:
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(request, pb.CreateChatCompletionRequest):
        messages = request.messages[:-1] or request.messages[:1]
        for message in messages:
            digest.update(message.SerializeToString(deterministic=True))
            digest.update(b"\x00")
    else:
        prompt = request.prompt
        kind = prompt.WhichOneof("kind")
        if kind == "string_value":
            digest.update(prompt.string_value[:TEXT_PREFIX_CHARS].encode())
        elif kind == "list_value" and prompt.list_value.values:
            digest.update(prompt.list_value.values[0].SerializeToString(deterministic=True)[:TEXT_PREFIX_CHARS])
        else:
            return ""
    return digest.hexdigest()
