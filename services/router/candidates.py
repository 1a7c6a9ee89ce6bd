"""Same-word candidates judged in the Router: verification first, then the similarity threshold.

Verification (services/cache/verification.py) decides whether a stored answer fits a prompt; the
threshold only narrows which verified candidates may answer, as in the Cache's KNN lookup. In this
order, a prompt whose same-word candidates all mean something else ("who sued Acme" / "Acme sued
who") is a miss at once, with no embedding on its path; only a prompt with an accepted candidate
waits for its vector, and then only to compare it with that candidate's stored one (cosine, as the
index measures it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from lmcluster.cache.v1 import cache_pb2

from services.cache.store import WordCandidate
from services.cache.verification import Reason, reason_name, verify


@dataclass(frozen=True)
class Judged:
    """Candidates verification accepted (with a stored vector to compare), and those it refused."""

    accepted: list[WordCandidate]
    rejected: list[cache_pb2.RejectedCandidate]

    def rejected_by_reason(self) -> Counter[str]:
        """The refusals as the Cache counts them (`GetStats.rejected_by_reason`)."""
        return Counter(reason_name(candidate.reason) for candidate in self.rejected)


def judge(prompt: str, candidates: Sequence[WordCandidate]) -> Judged:
    accepted: list[WordCandidate] = []
    rejected: list[cache_pb2.RejectedCandidate] = []
    for candidate in candidates:
        verdict = verify(prompt, candidate.prompt)
        if not verdict.accepted:
            reason = int(verdict.reason or Reason.UNEXPLAINED)
            rejected.append(
                cache_pb2.RejectedCandidate(entry_id=candidate.entry_id, reason=reason, detail=verdict.detail)
            )
        elif candidate.vector:  # an entry stored without a vector never answers semantically
            accepted.append(candidate)
    return Judged(accepted, rejected)


def similarity(vector: Sequence[float], stored: bytes) -> float:
    """Cosine similarity of a prompt's vector and a stored one (little-endian float32); -1 when
    their dimensions differ (a vector of another model is never close)."""
    mine = np.asarray(vector, dtype=np.float32)
    theirs = np.frombuffer(stored, dtype="<f4")
    if mine.shape != theirs.shape or not mine.size:
        return -1.0
    norms = float(np.linalg.norm(mine)) * float(np.linalg.norm(theirs))
    if norms == 0.0 or not np.isfinite(norms):
        return -1.0
    return float(np.clip(np.dot(mine, theirs) / norms, -1.0, 1.0))


def closest(vector: Sequence[float], accepted: Sequence[WordCandidate], threshold: float) -> tuple[WordCandidate, float] | None:
    """The accepted candidate most similar to `vector` at or above `threshold`, with its similarity."""
    scored = [(candidate, similarity(vector, candidate.vector)) for candidate in accepted]
    scored = [(candidate, score) for candidate, score in scored if score >= threshold]
    return max(scored, key=lambda pair: pair[1]) if scored else None
