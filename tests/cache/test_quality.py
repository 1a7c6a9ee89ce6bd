"""Quality of hits on the labelled pairs in tests/data/cache_pairs.jsonl, measured through the real
Lookup (gRPC, Redis Stack, all-MiniLM-L6-v2 embeddings) and against plain cosine similarity.

Each pair gets a scope of its own: the first prompt is stored, the second looked up. Floors, set
from the measurement recorded in docs/benchmarks.md (390 pairs, 147 paraphrases):
- at the default threshold 0.95: no must-not-hit pair hits, paraphrase recall >= 0.20 (measured 0.24);
- at a per-request threshold of 0.90: no must-not-hit pair hits, recall >= 0.45 (measured 0.52).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lmcluster.cache.v1 import cache_service_pb2 as pb
from lmcluster.cache.v1 import cache_service_pb2_grpc as pb_grpc

from services.cache.server import RunningCache
from tests.cache.conftest import Embedder

PAIRS_FILE = Path(__file__).resolve().parent.parent / "data" / "cache_pairs.jsonl"
KINDS = {"paraphrase", "number", "date", "unit", "negation", "order", "entity", "antonym", "unrelated"}
DEFAULT_RECALL_FLOOR = 0.20
RECALL_FLOOR_AT_090 = 0.45


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    kind: str
    should_hit: bool
    split: str


@dataclass(frozen=True)
class Score:
    """Precision and recall of hits; a hit on a must-not pair is a false positive."""

    true_hits: int
    false_hits: int
    paraphrases: int

    @property
    def precision(self) -> float:
        hits = self.true_hits + self.false_hits
        return self.true_hits / hits if hits else 1.0

    @property
    def recall(self) -> float:
        return self.true_hits / self.paraphrases if self.paraphrases else 0.0


def load_pairs() -> list[Pair]:
    pairs = []
    for line in PAIRS_FILE.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append(Pair(row["a"], row["b"], row["kind"], row["expect"] == "hit", row["split"]))
    return pairs


def score(pairs: list[Pair], hits: list[bool]) -> Score:
    return Score(
        true_hits=sum(1 for p, h in zip(pairs, hits, strict=True) if h and p.should_hit),
        false_hits=sum(1 for p, h in zip(pairs, hits, strict=True) if h and not p.should_hit),
        paraphrases=sum(1 for p in pairs if p.should_hit),
    )


def cosine_similarities(pairs: list[Pair], embed: Embedder) -> np.ndarray:
    a = np.asarray(embed.many([p.a for p in pairs]), dtype=np.float32)
    b = np.asarray(embed.many([p.b for p in pairs]), dtype=np.float32)
    return np.einsum("ij,ij->i", a, b)


async def lookup_hits(stub: pb_grpc.CacheServiceStub, pairs: list[Pair], embed: Embedder,
                      thresholds: list[float]) -> dict[float, list[bool]]:  # fmt: skip
    """Stores each pair's first prompt in a scope of its own and looks the second one up."""
    for i, pair in enumerate(pairs):
        reply = await stub.Store(pb.StoreRequest(scope=f"pair-{i}", embedding=embed(pair.a), prompt=pair.a,
                                                 response=b"answer", response_type="test.Answer"))  # fmt: skip
        assert reply.stored, reply.reason
    results: dict[float, list[bool]] = {}
    for threshold in thresholds:
        hits = []
        for i, pair in enumerate(pairs):
            reply = await stub.Lookup(pb.LookupRequest(scope=f"pair-{i}", embedding=embed(pair.b), prompt=pair.b,
                                                       threshold=threshold))  # fmt: skip
            assert not reply.degraded
            hits.append(reply.hit)
        results[threshold] = hits
    return results


def test_the_labelled_set_is_large_and_covers_every_kind() -> None:
    pairs = load_pairs()
    assert len(pairs) >= 200
    assert {p.kind for p in pairs} == KINDS
    assert sum(p.should_hit for p in pairs) >= 100
    assert all(p.should_hit == (p.kind == "paraphrase") for p in pairs)


async def test_full_lookup_precision_and_recall(cache: tuple[RunningCache, pb_grpc.CacheServiceStub],
                                                embed: Embedder) -> None:  # fmt: skip
    _, stub = cache
    pairs = load_pairs()
    similarities = cosine_similarities(pairs, embed)
    hits = await lookup_hits(stub, pairs, embed, [0.95, 0.90, 0.85])

    lines = []
    for threshold in (0.85, 0.90, 0.95, 0.98):
        plain = score(pairs, [bool(s >= threshold) for s in similarities])
        lines.append(f"cosine >= {threshold:.2f}: precision {plain.precision:.3f} recall {plain.recall:.3f}")
    for threshold, found in hits.items():
        full = score(pairs, found)
        lines.append(f"Lookup at {threshold:.2f}: precision {full.precision:.3f} recall {full.recall:.3f}")
    print("\n".join(lines))

    default = score(pairs, hits[0.95])
    wrong = [(p.kind, p.a, p.b) for p, h in zip(pairs, hits[0.95], strict=True) if h and not p.should_hit]
    assert default.false_hits == 0, wrong
    assert default.recall >= DEFAULT_RECALL_FLOOR, default
    # Plain cosine at the same threshold does let must-not pairs through: verification is what stops them.
    assert score(pairs, [bool(s >= 0.95) for s in similarities]).false_hits > 0

    lower = score(pairs, hits[0.90])
    wrong = [(p.kind, p.a, p.b) for p, h in zip(pairs, hits[0.90], strict=True) if h and not p.should_hit]
    assert lower.false_hits == 0, wrong
    assert lower.recall >= RECALL_FLOOR_AT_090, lower
