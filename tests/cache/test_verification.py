"""Verification rules on prompts written apart from tests/data/cache_pairs.jsonl (not tuned on)."""

from __future__ import annotations

import pytest

from services.cache.verification import (
    _ANTONYM_INDEX,
    _NEGATING_PREFIXES,
    Reason,
    analyze,
    lexicon_sizes,
    verify,
)

MUST_REJECT: list[tuple[str, str, Reason]] = [
    # numbers, dates, times, units
    ("Ship 3 boxes to Denver by Friday.", "Ship 4 boxes to Denver by Friday.", Reason.NUMBER),
    ("What's the penalty for paying taxes 30 days late?", "What's the penalty for paying taxes 60 days late?", Reason.NUMBER),
    ("Is a 2019 Honda Civic reliable?", "Is a 2015 Honda Civic reliable?", Reason.NUMBER),
    ("Book me a flight to Madrid on June 3rd.", "Book me a flight to Madrid on June 5th.", Reason.NUMBER),
    ("Is the store open until 9 pm?", "Is the store open until 9 am?", Reason.NUMBER),
    ("What's the interest on a loan of 5,000 euros?", "What's the interest on a loan of 50,000 euros?", Reason.NUMBER),
    ("How many tablespoons in a quarter cup?", "How many tablespoons in a third of a cup?", Reason.NUMBER),
    ("Will it rain in Seattle on Thursday?", "Will it rain in Seattle on Tuesday?", Reason.NUMBER),
    ("Is 98.6 degrees a normal body temperature?", "Is 99.6 degrees a normal body temperature?", Reason.NUMBER),
    ("What is the tax rate for income over $100k?", "What is the tax rate for income over $200k?", Reason.NUMBER),
    ("Should I water cacti daily?", "Should I water cacti weekly?", Reason.NUMBER),
    ("Compare the battery life of the Pixel 8 and the Pixel 7.", "Compare the battery life of the Pixel 8 and the Pixel 9.", Reason.NUMBER),
    ("Is the museum free on Sundays?", "Is the museum free on Saturdays?", Reason.NUMBER),
    ("Will it be sunny tomorrow in Rome?", "Will it be sunny today in Rome?", Reason.NUMBER),
    ("Convert 12 inches to centimeters.", "Convert 12 feet to centimeters.", Reason.NUMBER),
    ("What's 3/4 of a cup in grams?", "What's 1/2 of a cup in grams?", Reason.NUMBER),
    ("Schedule the call for 2:30 pm.", "Schedule the call for 3:30 pm.", Reason.NUMBER),
    ("What changed in Java 17?", "What changed in Java 21?", Reason.NUMBER),
    # negation, prefixes, privative compounds
    ("Does the lease permit subletting?", "Does the lease prohibit subletting?", Reason.ANTONYM),
    ("Is the medication covered by insurance?", "Is the medication not covered by insurance?", Reason.NEGATION),
    ("Is this product dishwasher-safe?", "Is this product not dishwasher-safe?", Reason.NEGATION),
    ("Is it reversible?", "Is it irreversible?", Reason.NEGATION),
    ("Write a regex that matches valid email addresses.", "Write a regex that matches invalid email addresses.", Reason.NEGATION),
    ("Explain why the patient should not take aspirin.", "Explain why the patient should take aspirin.", Reason.NEGATION),
    ("Is this formula lactose-free?", "Does this formula have lactose?", Reason.NEGATION),
    ("Is the tool useful for beginners?", "Is the tool useless for beginners?", Reason.NEGATION),
    ("Why does the build succeed on CI?", "Why does the build fail to succeed on CI?", Reason.NEGATION),
    ("Are pets allowed in the apartment?", "Are pets forbidden in the apartment?", Reason.ANTONYM),
    ("Is it legal to park on the sidewalk?", "Is it unlawful to park on the sidewalk?", Reason.ANTONYM),
    # opposites
    ("What is the minimum age to rent a car in Italy?", "What is the maximum age to rent a car in Italy?", Reason.ANTONYM),
    ("How do I increase the volume on my TV?", "How do I lower the volume on my TV?", Reason.ANTONYM),
    ("Can I cancel my order before it ships?", "Can I cancel my order after it ships?", Reason.ANTONYM),
    ("Is the pool heated in winter?", "Is the pool heated in summer?", Reason.NUMBER),
    ("What are the arguments in favor of nuclear power?", "What are the arguments against nuclear power?", Reason.ANTONYM),
    ("Does the seller pay closing costs?", "Does the buyer pay closing costs?", Reason.ANTONYM),
    ("Sort the list in ascending order.", "Sort the list in descending order.", Reason.ANTONYM),
    ("Why is my bread so dense?", "Why is my bread so airy?", Reason.ANTONYM),
    ("How do I turn on dark mode in Slack?", "How do I turn off dark mode in Slack?", Reason.ANTONYM),
    ("What's the dose for an adult?", "What's the dose for a child?", Reason.ANTONYM),
    # entities
    ("Summarize the Q3 earnings report from Initech.", "Summarize the Q3 earnings report from Hooli.", Reason.ENTITY),
    ("How do I get a driver's license in Texas?", "How do I get a driver's license in Ohio?", Reason.ENTITY),
    ("What is the warranty period for Samsung phones?", "What is the warranty period for Xiaomi phones?", Reason.ENTITY),
    ("Translate 'I love you' into German.", "Translate 'I love you' into Dutch.", Reason.ENTITY),
    ("Is the iPhone 15 waterproof?", "Is the Galaxy S23 waterproof?", Reason.NUMBER),
    # order, roles, direction
    ("Transfer $250 from checking to savings.", "Transfer $250 from savings to checking.", Reason.ORDER),
    ("Can the landlord enter without notice?", "Can the tenant enter without notice?", Reason.ANTONYM),
    ("How do I convert a PNG to a JPEG?", "How do I convert a JPEG to a PNG?", Reason.ORDER),
    ("Who owes money to whom if Alice lent Bob $50?", "Who owes money to whom if Bob lent Alice $50?", Reason.ORDER),
    ("Send the report to the client before the meeting.", "Send the report to the client after the meeting.", Reason.ANTONYM),
    ("Can a manager fire an employee for being sick?", "Can an employee fire a manager for being sick?", Reason.ORDER),
    ("Do babies need more sleep than adults?", "Do adults need more sleep than babies?", Reason.ORDER),
    ("How long does the train from London to Edinburgh take?", "How long is the Edinburgh to London train journey?", Reason.ORDER),
    ("How do I send money from PayPal to my bank?", "How do I move money from my bank into PayPal?", Reason.ORDER),
    ("Does the parent company own the subsidiary's debt?", "Does the subsidiary own the parent company's debt?", Reason.ORDER),
    ("Is it cheaper to ship from China to Germany?", "Is shipping from Germany to China cheaper?", Reason.ORDER),
    ("Is Disney+ cheaper than Netflix?", "Is Netflix cheaper than Disney+?", Reason.ORDER),
    ("How much is 100 USD in EUR?", "Convert 100 EUR to USD.", Reason.ORDER),
    ("How many euros is 20 pounds sterling?", "How many pounds sterling is 20 euros?", Reason.ORDER),
]  # fmt: skip

MUST_ACCEPT: list[tuple[str, str]] = [
    ("How do I cancel my gym membership?", "What's the process for cancelling my gym membership?"),
    ("What's the tax rate for income over $100k?", "What is the tax rate on income above $100,000?"),
    ("Ship 3 boxes to Denver by Friday.", "Please ship three boxes to Denver by Friday."),
    ("Is the medication covered by insurance?", "Does insurance cover this medication?"),
    ("Is it legal to park on the sidewalk?", "Is parking on the sidewalk legal?"),
    ("What time does the pharmacy close on Sunday?", "When does the pharmacy close on Sundays?"),
    ("Give me a 7-day meal plan for weight loss.", "Create a seven-day meal plan to lose weight."),
    ("How many tablespoons are in a quarter cup?", "How many tbsp make up 1/4 cup?"),
    ("What's the difference between Kafka and RabbitMQ?", "How does RabbitMQ differ from Kafka?"),
    ("Why won't my car start in cold weather?", "Why does my car fail to start when it's cold?"),
    ("What's the UK's population?", "How many people live in the United Kingdom?"),
    ("How do I stop my Mac from sleeping?", "How can I prevent my Mac from going to sleep?"),
    ("Is smoking allowed on the balcony?", "Is smoking not forbidden on the balcony?"),
    ("Is this medicine unsafe for kids?", "Is this medicine not safe for kids?"),
    ("I forgot my PIN, what now?", "I can't remember my PIN, what now?"),
    ("From London, how long is the train to Edinburgh?", "How long does the train from London to Edinburgh take?"),
    ("Is Postgres better than MySQL for analytics?", "For analytics workloads, is Postgres better than MySQL?"),
    ("What do cats and dogs have in common?", "What do dogs and cats have in common?"),
    ("Which is healthier, rice or quinoa?", "Quinoa or rice: which one is healthier?"),
    ("How do I send money from PayPal to my bank?", "How can I transfer funds to my bank account from PayPal?"),
    ("In Excel, how do I freeze the top row?", "How do I freeze the top row in Excel?"),
    ("I'm visiting Rome next month. What should I see?", "What should I see in Rome? I'm visiting next month."),
    ("For a 10-year-old, what is a good first programming language?", "What's a good first programming language for a 10-year-old?"),
    ("How do I get to the Eiffel Tower from the Louvre?", "What's the route from the Louvre to the Eiffel Tower?"),
    ("Who won the 2018 World Cup?", "Which country won the World Cup in 2018?"),
    ("What's the difference between a Roth IRA and a traditional IRA?", "How does a traditional IRA differ from a Roth IRA?"),
    ("How much is 50 euros in US dollars?", "Convert 50 EUR to USD."),
    ("Meeting at 3 pm on March 5, 2025?", "Meeting at 15:00 on 2025-03-05?"),
    ("Explain what APIs are.", "Explain what an API is."),
    ("What is inflation in economics?", "Can you explain what economic inflation is?"),
    ("When did World War II end?", "In what year did the Second World War end?"),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "candidate", "reason"), MUST_REJECT)
def test_near_duplicates_with_another_meaning_are_rejected(
    prompt: str, candidate: str, reason: Reason
) -> None:
    for first, second in ((prompt, candidate), (candidate, prompt)):
        verdict = verify(first, second)
        assert not verdict.accepted, (first, second)
        assert verdict.reason is reason, (first, second, verdict)
        assert verdict.detail and len(verdict.detail) <= 120


@pytest.mark.parametrize(("prompt", "candidate"), MUST_ACCEPT)
def test_paraphrases_are_accepted(prompt: str, candidate: str) -> None:
    assert verify(prompt, candidate).accepted, verify(prompt, candidate)
    assert verify(candidate, prompt).accepted, verify(candidate, prompt)


def test_identical_prompts_are_accepted() -> None:
    assert verify("Convert 100 USD to EUR.", "Convert 100 USD to EUR.").accepted


def test_numbers_are_read_into_canonical_values() -> None:
    numbers = analyze("one thousand, 1,000 and 1k and twenty five and 2.50 and 3rd and half").numbers
    assert numbers == {"1000": 3, "25": 1, "2.50": 1, "3": 1, "0.5": 1}
    assert analyze("Python 3.10").numbers != analyze("Python 3.1").numbers


def test_dates_and_times_are_read_into_canonical_values() -> None:
    assert analyze("on March 5, 2025 at 3 pm").dates == analyze("on 2025-03-05 at 15:00").dates
    assert analyze("on 5 March 2025").dates == analyze("on March 5th, 2025").dates
    assert analyze("next week").dates != analyze("last week").dates
    # "may" the verb and "March" the verb are not months
    assert not analyze("May I march in the parade?").dates


def test_units_and_currencies_are_canonical() -> None:
    assert analyze("5 kilometres").units == analyze("5 km").units == {"km"}
    assert analyze("$20").quantities == analyze("20 US dollars").quantities == analyze("20 USD").quantities
    assert analyze("30 °C").units == analyze("30 degrees Celsius").units == {"celsius"}


def test_long_prompts_are_verified_without_the_pairwise_order_check() -> None:
    document = "The quick brown fox jumps over the lazy dog. " * 300
    assert verify(document + "Summarize it.", document + "Please summarize it.").accepted
    assert not verify(document + "Summarize it in 3 lines.", document + "Summarize it in 5 lines.").accepted


def test_the_antonym_lexicon_is_sizeable_and_leaves_prefix_negation_to_the_prefix_rule() -> None:
    sizes = lexicon_sizes()
    assert sizes["antonym_groups"] >= 120 and sizes["antonym_forms"] >= 1000 and sizes["units"] >= 150
    # A word and its prefixed negation on the two sides of a group would be counted twice.
    for form in _ANTONYM_INDEX:
        for prefix in _NEGATING_PREFIXES:
            if form.startswith(prefix) and form[len(prefix) :] in _ANTONYM_INDEX:
                groups = {g for g, _ in _ANTONYM_INDEX[form]} & {
                    g for g, _ in _ANTONYM_INDEX[form[len(prefix) :]]
                }
                for group in groups:
                    sides = {s for g, s in _ANTONYM_INDEX[form] if g == group} | {
                        s for g, s in _ANTONYM_INDEX[form[len(prefix) :]] if g == group
                    }
                    # Allowed only where the prefix rule and the lexicon agree on the opposition.
                    assert len(sides) == 2, (form, group)
