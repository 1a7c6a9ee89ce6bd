"""Verification accepts only differences shown harmless; everything else, in any language, is refused.

The prompts here were written apart from tests/data (the labelled pairs measure the whole Lookup in
tests/cache/test_quality.py).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from services.cache.verification import Reason, match_keys, verify
from services.common.prompt_text import canonical_tokens, surface_tokens

HARMLESS: list[tuple[str, str]] = [
    # case, spacing, punctuation, Unicode compatibility forms
    ("What is the capital of Peru?", "what is the capital of peru"),
    ("Explain   photosynthesis.", "Explain photosynthesis"),
    ("Why is the sea salty?", "Why is the sea salty?!"),
    ("Ｗｈａｔ ｉｓ ｐｉ？", "What is pi?"),
    ("What are the side effects of ibuprofen?", "What are the side\u00a0effects of ibuprofen ?"),
    # politeness and greetings at the edges, "please" before a request
    ("Hi! How does a transistor work?", "How does a transistor work?"),
    ("What is a hash table? Thanks in advance.", "What is a hash table?"),
    ("Please list the noble gases.", "List the noble gases."),
    ("Bonjour, comment fonctionne une pile ?", "Comment fonctionne une pile ?"),
    ("Wie funktioniert ein Motor? Danke!", "Wie funktioniert ein Motor?"),
    ("Hola, ¿cómo funciona un imán?", "¿Cómo funciona un imán?"),
    # English contractions, with or without the apostrophe, and articles
    ("Why doesn't ice sink?", "Why does not ice sink?"),
    ("Whats a monad?", "What is a monad?"),
    ("What is an interpreter?", "What is the interpreter?"),
    ("A list or a tuple, which is faster?", "list or tuple, which is faster?"),
    # a request's framing, a how-to question's framing
    ("Can you summarize the French Revolution?", "Summarize the French Revolution."),
    ("Could you please translate 'cat' into Welsh?", "Translate 'cat' into Welsh."),
    ("How do I tie a bowline knot?", "How can I tie a bowline knot?"),
    ("What's the best way to peel garlic?", "How do I peel garlic?"),
    # the two moves that keep the meaning
    ("In Rust, how do I read a file?", "How do I read a file in Rust?"),
    ("What is the difference between tea and coffee?", "What is the difference between coffee and tea?"),
    # code outside prose only differs by trailing spaces
    ("Explain this:\n```js\nlet x = 1;   \n```", "explain this:\n```js\nlet x = 1;\n```"),
    # ideographic scripts, spacing and punctuation
    ("富士山の高さは？", "富士山の 高さは"),
]

CHANGED: list[tuple[str, str, Reason]] = [
    # roles exchanged by word order, by pronouns, by case in German
    ("Who did Initech sue?", "Who sued Initech?", Reason.UNEXPLAINED),
    ("Why did the fox chase the hen?", "Why did the hen chase the fox?", Reason.ORDER),
    ("Did he pay her?", "Did she pay him?", Reason.UNEXPLAINED),
    ("Wer hat den Richter bestochen?", "Wen hat der Richter bestochen?", Reason.UNEXPLAINED),
    ("Should I wash and then dry the jeans?", "Should I dry and then wash the jeans?", Reason.ORDER),
    # quantifiers, modals, verbs, tense, comparatives
    ("Are all spiders venomous?", "Are some spiders venomous?", Reason.UNEXPLAINED),
    ("Can I eat mushrooms raw?", "Should I eat mushrooms raw?", Reason.UNEXPLAINED),
    ("How do I enable SSH on a Raspberry Pi?", "How do I disable SSH on a Raspberry Pi?", Reason.UNEXPLAINED),
    ("Who is the mayor of Oslo?", "Who was the mayor of Oslo?", Reason.UNEXPLAINED),
    ("Is silver denser than copper?", "Is silver lighter than copper?", Reason.UNEXPLAINED),
    # names in lower case, negation, numbers, dates, symbols
    ("what is the capital of slovenia", "what is the capital of slovakia", Reason.UNEXPLAINED),
    ("Which snakes are venomous?", "Which snakes are not venomous?", Reason.NEGATION),
    ("Why won't the engine start?", "Why will the engine start?", Reason.NEGATION),
    ("How much is 40 GBP in yen?", "How much is 400 GBP in yen?", Reason.NUMBER),
    ("Is it -4 degrees in Oslo?", "Is it 4 degrees in Oslo?", Reason.UNEXPLAINED),
    ("What happened on 3 May 1808?", "What happened on 2 May 1808?", Reason.NUMBER),
    ("What is IT?", "What is it?", Reason.UNEXPLAINED),
    ("What is hepatitis A?", "What is hepatitis?", Reason.UNEXPLAINED),
    ("Where'd you go after the party?", "Where would you go after the party?", Reason.UNEXPLAINED),
    # accents are letters: "où" is where, "ou" is or; "sí" is yes, "si" is if
    ("Où est la poste ?", "Ou est la poste ?", Reason.UNEXPLAINED),
    # "a" is an article only in English
    ("¿A quién llamó Marta?", "¿Quién llamó Marta?", Reason.UNEXPLAINED),
    # the same greeting words inside a sentence are content
    ("How do I say thank you in Greek?", "How do I say hello in Greek?", Reason.UNEXPLAINED),
    # code keeps its case and spacing
    ("Why does `Foo.bar()` fail?", "Why does `foo.bar()` fail?", Reason.UNEXPLAINED),
    ("print(X) raises NameError", "print(x) raises NameError", Reason.UNEXPLAINED),
]


@pytest.mark.parametrize(("prompt", "candidate"), HARMLESS)
def test_harmless_differences_are_accepted_both_ways(prompt: str, candidate: str) -> None:
    assert verify(prompt, candidate).accepted, verify(prompt, candidate)
    assert verify(candidate, prompt).accepted, verify(candidate, prompt)


@pytest.mark.parametrize(("prompt", "candidate", "reason"), CHANGED)
def test_any_other_difference_is_refused_with_a_reason(prompt: str, candidate: str, reason: Reason) -> None:
    for first, second in ((prompt, candidate), (candidate, prompt)):
        verdict = verify(first, second)
        assert not verdict.accepted, (first, second)
        assert verdict.reason is reason, (first, second, verdict)
        assert verdict.detail and len(verdict.detail) <= 120


def test_a_long_prompt_is_compared_whole() -> None:
    document = " ".join(f"Clause {i} of the contract binds the parties named above." for i in range(120))
    tail_a = "The deposit is refundable within 30 days."
    tail_b = "The deposit is refundable within 60 days."
    question = "\n\nWhen can I get the deposit back?"
    assert len(document.split()) > 1000
    assert verify(document + tail_a + question, document + "  " + tail_a + question).accepted
    verdict = verify(document + tail_a + question, document + tail_b + question)
    assert not verdict.accepted and verdict.reason is Reason.NUMBER


def test_unknown_words_in_any_script_are_never_folded() -> None:
    assert not verify("Что такое квант?", "Что такое кварк?").accepted
    assert not verify("量子とは何ですか", "電子とは何ですか").accepted
    assert verify("Что такое квант?", "что такое квант").accepted


def test_surface_tokens_keep_numbers_symbols_and_code() -> None:
    assert surface_tokens("It costs $1,000.50 (about 2%)!") == ("it", "costs", "$", "1,000.50", "about", "2", "%")
    assert surface_tokens("x = f(Y)") == ("\x00code\x00x = f(Y)",)
    assert canonical_tokens("Hi, could you please explain the GIL?") == ("explain", "GIL")


def _labelled_pairs() -> list[tuple[str, str]]:
    data = Path(__file__).resolve().parents[1] / "data"
    return [
        (pair["a"], pair["b"])
        for name in ("cache_pairs.jsonl", "cache_pairs_holdout.jsonl")
        for pair in map(json.loads, (data / name).read_text().splitlines())
    ]


def _reorderings(prompt: str, rng: random.Random) -> list[str]:
    """The prompt with words exchanged, moved and fronted: candidates verification may accept."""
    words = prompt.rstrip("?").split()
    found = [" ".join(words[:i] + [words[i + 2], words[i + 1], words[i]] + words[i + 3 :]) + "?"
             for i in range(len(words) - 2)]  # fmt: skip
    for cut in range(1, len(words)):
        found.append(f"In {' '.join(words[cut:])}, {' '.join(words[:cut])}?")
        found.append(f"{' '.join(words[cut:])} in {' '.join(words[:cut])}?")
    found += [" ".join(rng.sample(words, len(words))) + "?" for _ in range(5)]
    return found


def test_prompts_verification_accepts_share_a_match_key() -> None:
    """`match_keys` is a necessary condition of acceptance: a lookup that finds no entry sharing a
    key may skip the embedding, the KNN search and the verification without losing a hit."""
    rng = random.Random(7)
    pairs = [*HARMLESS, *((a, b) for a, b, _ in CHANGED), *_labelled_pairs()]
    pairs += [(a, moved) for a, _ in pairs[:400] for moved in _reorderings(a, rng)]
    pairs += [(a, b) for (a, _), (b, _) in itertools.pairwise(pairs[:300])]
    accepted = 0
    for first, second in pairs:
        for prompt, candidate in ((first, second), (second, first)):
            if verify(prompt, candidate).accepted:
                accepted += 1
                assert set(match_keys(prompt)) & set(match_keys(candidate)), (prompt, candidate)
    assert accepted > 100  # the check saw accepted pairs of every kind, not only refusals


def test_match_keys_tell_apart_prompts_with_other_words() -> None:
    assert set(match_keys("In Rust, how do I read a file?")) & set(match_keys("How do I read a file in Rust?"))
    assert match_keys("Is tea or coffee stronger?") == match_keys("Is coffee or tea stronger?")
    assert not set(match_keys("Who did Initech sue?")) & set(match_keys("Who sued Initech?"))
    assert not set(match_keys("Which snakes are venomous?")) & set(match_keys("Which snakes are not venomous?"))
