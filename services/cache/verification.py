"""Verification of a semantic candidate: is every difference between the two prompts harmless?

The embedding only finds candidates; it cannot tell "who did Acme sue" from "who sued Acme" (both
score above 0.97), and it reads only the first 256 word pieces of a long prompt. So a candidate is
served only when the two whole prompts are equal once every difference known to be harmless is
folded away (services/common/prompt_text.py: case, spacing, punctuation outside code, politeness,
contractions, articles, a request's framing), or when they differ by one of two moves that keep
the meaning: a phrase fronted with a comma moved to the end ("In Excel, how do I freeze a row" /
"How do I freeze a row in Excel"), or two single words exchanged around "and", "or" or "vs"
("TCP and UDP" / "UDP and TCP"). Any other difference, in any language, is a miss: a word
replaced, added, removed or moved, a number, a name, a negation.

Equal canonical prompts share an exact key, so they hit before any embedding; a semantic hit is
one of the two moves. There is no list of
dangerous differences to keep up to date; the lists are of harmless ones, and a word missing from
them costs a hit, never a wrong answer. docs/cache.md says what is accepted and why.

The reason given for a refusal is for operators (GetStats, traces); it never decides anything.

Every accepted pair keeps the words of a prompt and only moves them, so `match_keys` can tell
before any embedding whether an entry could be accepted at all (services/cache/index.py indexes
them; a lookup with no entry sharing a key skips the embedding and the KNN search).
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher

from lmcluster.cache.v1 import cache_pb2

from services.common.prompt_text import CANON_VERSION, canonical_tokens, fronted_phrase_moved


class Reason(enum.IntEnum):
    """Why a candidate was refused; the values are the proto's RejectionReason numbers."""

    NUMBER = 1
    NEGATION = 2
    ORDER = 3
    UNEXPLAINED = 7


def reason_name(reason: int) -> str:
    """A RejectionReason as counts, metrics and spans name it ("ORDER")."""
    return cache_pb2.RejectionReason.Name(reason).removeprefix("REJECTION_REASON_")


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing a prompt with a candidate's prompt."""

    accepted: bool
    reason: Reason | None = None
    # The words that differ, short enough for a log line (never a whole prompt).
    detail: str = ""


ACCEPTED = Verdict(True)
_SYMMETRIC_CONNECTORS = {"and", "or", "vs", "versus", "und", "oder", "et", "ou", "y", "o", "e"}
# Words that make a coordination an order of events or a mapping ("X and then Y", "respectively").
_SEQUENCE_WORDS = {"then", "respectively", "first", "before", "after", "followed", "puis", "dann", "luego", "después"}
_DETAIL_CHARS = 120
_MAX_DIFF_TOKENS = 64
# Only to name the reason of a refusal (never to accept anything).
_NEGATIONS = {
    "not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "without",
    "ne", "pas", "jamais", "aucun", "aucune", "sans", "nicht", "kein", "keine", "keinen", "nie", "ohne",
    "nunca", "ningún", "ninguna", "ninguno", "sin", "nadie", "nada", "non",
}  # fmt: skip


def verify(prompt: str, candidate: str) -> Verdict:
    """Accepts the candidate only if the two prompts are equal up to harmless differences."""
    mine, theirs = canonical_tokens(prompt), canonical_tokens(candidate)
    if mine == theirs or _conjuncts_exchanged(mine, theirs):
        return ACCEPTED
    if fronted_phrase_moved(prompt) == theirs or fronted_phrase_moved(candidate) == mine:
        return ACCEPTED
    return _refusal(mine, theirs)


def match_keys(prompt: str) -> tuple[str, ...]:
    """Keys such that `verify` can accept two prompts only if their keys intersect.

    `verify` accepts equal canonical tokens, two of them exchanged around a connector, or one
    prompt's tokens with its fronted phrase moved equal to the other's. Each case leaves the
    multiset of one prompt's tokens (as written, or with its fronted phrase moved) equal to the
    other's, so the keys are those multisets, hashed: the written tokens and, where the prompt
    fronts a phrase, the moved ones. A hash collision only costs a lookup that finds nothing.
    """
    forms = {canonical_tokens(prompt)}
    moved = fronted_phrase_moved(prompt)
    if moved is not None:
        forms.add(moved)
    return tuple(sorted(_bag_key(form) for form in forms))


def _bag_key(tokens: tuple[str, ...]) -> str:
    words = "\x1f".join(sorted(tokens))
    return hashlib.blake2b(f"{CANON_VERSION}\x00{words}".encode(), digest_size=8).hexdigest()


def _conjuncts_exchanged(mine: tuple[str, ...], theirs: tuple[str, ...]) -> bool:
    """Equal but for two single words exchanged around a symmetric connector ("X and Y")."""
    if len(mine) != len(theirs):
        return False
    differ = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
    if len(differ) != 2 or differ[1] - differ[0] != 2:
        return False
    first, second = differ
    words = (mine[first], mine[second])
    return (
        mine[first + 1] in _SYMMETRIC_CONNECTORS
        and (theirs[first], theirs[second]) == (words[1], words[0])
        and all(w.isalpha() for w in words)
        and not _SEQUENCE_WORDS & set(mine)
    )


def _shown(token: str) -> str:
    return "<code>" if token.startswith("\x00code\x00") else token


def _refusal(mine: tuple[str, ...], theirs: tuple[str, ...]) -> Verdict:
    # Only the stretch between the common start and the common end is compared token by token
    # (bounded, so that two long documents never cost more than a short diff).
    start = 0
    while start < min(len(mine), len(theirs)) and mine[start] == theirs[start]:
        start += 1
    end = 0
    while end < min(len(mine), len(theirs)) - start and mine[-1 - end] == theirs[-1 - end]:
        end += 1
    left_middle = mine[start : len(mine) - end][:_MAX_DIFF_TOKENS]
    right_middle = theirs[start : len(theirs) - end][:_MAX_DIFF_TOKENS]
    differing: list[str] = []
    pairs: list[str] = []
    matcher = SequenceMatcher(a=left_middle, b=right_middle, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        left, right = left_middle[i1:i2], right_middle[j1:j2]
        differing += [*left, *right]
        pairs.append(f"{' '.join(map(_shown, left)) or '-'} / {' '.join(map(_shown, right)) or '-'}")
    detail = "; ".join(pairs)
    if len(detail) > _DETAIL_CHARS:
        detail = detail[: _DETAIL_CHARS - 3] + "..."
    if Counter(mine) == Counter(theirs):
        reason = Reason.ORDER
    elif any(any(c.isdigit() for c in token) for token in differing):
        reason = Reason.NUMBER
    elif any(token in _NEGATIONS or token.endswith("n't") for token in differing):
        reason = Reason.NEGATION
    else:
        reason = Reason.UNEXPLAINED
    return Verdict(False, reason, detail or "the prompts differ")
