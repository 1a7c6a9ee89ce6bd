"""Quality of hits on the labelled pairs of tests/data, measured through the real Lookup (gRPC,
Redis Stack, all-MiniLM-L6-v2 embeddings) as the Router asks it: exact key and embedding together.

`cache_pairs.jsonl` holds pairs that may be looked at while the verifier is worked on;
`cache_pairs_holdout.jsonl` holds pairs that never are. Each pair gets a scope of its own: the first
prompt is stored, the second looked up at every threshold the API accepts (a request may ask for
any threshold; the service raises it to `min_threshold`, 0.80). The floor: no must-not pair hits at
any of them, on either file. docs/benchmarks.md records the per-class table this test prints
(`pytest tests/cache/test_quality.py -s`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lmcluster.cache.v1 import cache_service_pb2 as pb
from lmcluster.cache.v1 import cache_service_pb2_grpc as pb_grpc

from services.cache.server import RunningCache
from services.common.cache_scope import exact_key_for
from services.common.prompt_text import canonical_tokens
from tests.cache.conftest import Embedder

DATA = Path(__file__).resolve().parent.parent / "data"
PAIR_FILES = (DATA / "cache_pairs.jsonl", DATA / "cache_pairs_holdout.jsonl")
THRESHOLDS = (0.95, 0.90, 0.85, 0.80)
MUST_HIT_KINDS = {"paraphrase", "near_verbatim", "long_repeat"}
LANGUAGE_KINDS = {"french", "german", "spanish"}
NEAR_VERBATIM_FLOOR = 0.95


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    kind: str
    should_hit: bool
    source: str


def load_pairs() -> list[Pair]:
    pairs = []
    for path in PAIR_FILES:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                pairs.append(Pair(row["a"], row["b"], row["kind"], row["expect"] == "hit", path.stem))
    return pairs


async def lookup_hits(stub: pb_grpc.CacheServiceStub, pairs: list[Pair], embed: Embedder) -> dict[float, list[bool]]:
    """Stores each pair's first prompt in a scope of its own and looks the second one up."""
    embed.many([p.a for p in pairs] + [p.b for p in pairs])
    for i, pair in enumerate(pairs):
        scope = f"pair-{i}"
        reply = await stub.Store(pb.StoreRequest(
            scope=scope, exact_key=exact_key_for(scope, pair.a), embedding=embed(pair.a), prompt=pair.a,
            response=b"answer", response_type="test.Answer",
        ))  # fmt: skip
        assert reply.stored, reply.reason
    results: dict[float, list[bool]] = {}
    for threshold in THRESHOLDS:
        hits = []
        for i, pair in enumerate(pairs):
            scope = f"pair-{i}"
            reply = await stub.Lookup(pb.LookupRequest(
                scope=scope, exact_key=exact_key_for(scope, pair.b), embedding=embed(pair.b), prompt=pair.b,
                threshold=threshold,
            ))  # fmt: skip
            assert not reply.degraded
            hits.append(reply.hit)
        results[threshold] = hits
    return results


def cosines(pairs: list[Pair], embed: Embedder) -> list[float]:
    return [float(np.dot(embed(p.a), embed(p.b))) for p in pairs]


def class_table(pairs: list[Pair], results: dict[float, list[bool]], similarity: list[float]) -> str:
    """Markdown: per class, the Lookup's hits at each threshold, and in brackets plain cosine's.

    A hit is right only for the must-hit classes: for them it is recall, for the others a false hit.
    """
    rows: dict[tuple[str, bool], list[int]] = defaultdict(lambda: [0] * (1 + 2 * len(THRESHOLDS)))
    for i, pair in enumerate(pairs):
        row = rows[(pair.kind, pair.should_hit)]
        row[0] += 1
        for t, threshold in enumerate(THRESHOLDS):
            row[1 + 2 * t] += results[threshold][i]
            row[2 + 2 * t] += similarity[i] >= threshold
    header = "| class | expect | pairs | " + " | ".join(f"hits at {t:.2f} (cosine)" for t in THRESHOLDS) + " |"
    lines = [header, "|" + "---|" * (3 + len(THRESHOLDS))]
    for (kind, should_hit), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        cells = [f"{row[1 + 2 * t]} ({row[2 + 2 * t]})" for t in range(len(THRESHOLDS))]
        lines.append(f"| {kind} | {'hit' if should_hit else 'miss'} | {row[0]} | " + " | ".join(cells) + " |")
    for threshold in THRESHOLDS:
        found = results[threshold]
        true_hits = sum(h and p.should_hit for p, h in zip(pairs, found, strict=True))
        false_hits = sum(h and not p.should_hit for p, h in zip(pairs, found, strict=True))
        must_hit = sum(p.should_hit for p in pairs)
        precision = true_hits / (true_hits + false_hits) if true_hits + false_hits else 1.0
        plain = sum(similarity[i] >= threshold and not p.should_hit for i, p in enumerate(pairs))
        lines.append(f"\nat {threshold:.2f}: precision {precision:.3f}, recall {true_hits / must_hit:.3f} "
                     f"({true_hits} of {must_hit} must-hit pairs), false hits {false_hits} "
                     f"(plain cosine: {plain})")  # fmt: skip
    return "\n".join(lines)


def test_the_labelled_sets_are_large_and_varied() -> None:
    pairs = load_pairs()
    assert len(pairs) >= 600
    must_not = {p.kind for p in pairs if not p.should_hit}
    assert len(must_not) >= 10, must_not
    assert LANGUAGE_KINDS <= must_not and "long" in must_not
    assert all(p.should_hit == (p.kind in MUST_HIT_KINDS) for p in pairs)
    assert {p.source for p in pairs} == {"cache_pairs", "cache_pairs_holdout"}
    holdout = [p for p in pairs if p.source == "cache_pairs_holdout"]
    assert len(holdout) >= 100 and {p.kind for p in holdout} >= must_not - {"antonym", "entity", "order", "unit", "unrelated"}
    # The long pairs differ only past MiniLM's 256 word pieces: the embedding alone cannot tell them apart.
    assert all(len(p.a.split()) > 300 for p in pairs if p.kind in ("long", "long_repeat"))


async def test_no_must_not_pair_hits_at_any_threshold(
    cache: tuple[RunningCache, pb_grpc.CacheServiceStub], embed: Embedder
) -> None:
    _, stub = cache
    pairs = load_pairs()
    results = await lookup_hits(stub, pairs, embed)
    similarity = cosines(pairs, embed)
    print("\n" + class_table(pairs, results, similarity))
    holdout = [i for i, p in enumerate(pairs) if p.source == "cache_pairs_holdout"]
    print("\nholdout only:\n" + class_table([pairs[i] for i in holdout],
                                            {t: [found[i] for i in holdout] for t, found in results.items()},
                                            [similarity[i] for i in holdout]))  # fmt: skip
    for threshold, found in results.items():
        wrong = [(p.kind, p.a[-80:], p.b[-80:]) for p, h in zip(pairs, found, strict=True) if h and not p.should_hit]
        assert not wrong, (threshold, wrong)
        # Prompts equal up to harmless differences share an exact key: found at every threshold.
        missed = [(p.a, p.b) for p, h in zip(pairs, found, strict=True)
                  if not h and canonical_tokens(p.a) == canonical_tokens(p.b)]  # fmt: skip
        assert not missed, (threshold, missed)
    near = [h for p, h in zip(pairs, results[0.95], strict=True) if p.kind in ("near_verbatim", "long_repeat")]
    assert sum(near) / len(near) >= NEAR_VERBATIM_FLOOR
