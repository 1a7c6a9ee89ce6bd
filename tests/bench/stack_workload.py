"""The workload lmcluster is made for: people asking questions about a few documents (RAG).

Four short documents (plans and prices of four made-up companies), each the system message of the
requests about it; the user's question is the final message, as a retrieval pipeline sends it.
Every document describes four items with four attributes, and every attribute has one question
and two paraphrases written the way different people ask: 64 distinct questions, 192 wordings.

`sequence(total, new_share, gap=...)` is one run's requests in arrival order: a share `new_share`
are the first time a question is asked; the rest repeat an earlier question, half with the same
words and half in another wording, drawn uniformly from the questions first asked at least `gap`
requests before them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM = (
    "You answer customer questions using only the document below. Answer in one short sentence.\n\n"
    "Document:\n{document}"
)


@dataclass(frozen=True)
class Attribute:
    question: str
    paraphrases: tuple[str, str]


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    items: tuple[str, ...]
    attributes: tuple[Attribute, ...]


DOCUMENTS = (
    Document(
        name="hosting",
        text=(
            "Northwind Cloud hosting plans. The Starter plan costs 9 euros per month, includes 20 GB of "
            "storage, email support on weekdays and a 99.0% uptime guarantee. The Team plan costs 29 euros "
            "per month, includes 100 GB of storage, email and chat support every day and a 99.5% uptime "
            "guarantee. The Business plan costs 79 euros per month, includes 500 GB of storage, phone "
            "support around the clock and a 99.9% uptime guarantee. The Enterprise plan is priced per "
            "contract, includes unlimited storage, a named support engineer and a 99.99% uptime guarantee. "
            "Every plan can be cancelled at the end of any month."
        ),
        items=("Starter plan", "Team plan", "Business plan", "Enterprise plan"),
        attributes=(
            Attribute("How much does the {item} cost?", ("What is the price of the {item}?", "What's the monthly cost of the {item}?")),
            Attribute("How much storage does the {item} include?", ("How much storage comes with the {item}?", "What amount of storage is included in the {item}?")),
            Attribute("What support does the {item} include?", ("What kind of support comes with the {item}?", "Which support is included in the {item}?")),
            Attribute("What uptime guarantee does the {item} have?", ("What is the uptime guarantee of the {item}?", "Which uptime does the {item} guarantee?")),
        ),
    ),
    Document(
        name="mobile",
        text=(
            "Contoso Mobile phone plans. The Basic plan costs 12 dollars a month with 5 GB of data, no "
            "roaming and a 12-month contract. The Plus plan costs 25 dollars a month with 30 GB of data, "
            "roaming in Europe and a 12-month contract. The Max plan costs 45 dollars a month with "
            "unlimited data, worldwide roaming and a 24-month contract. The Family plan costs 70 dollars a "
            "month for four lines sharing 100 GB of data, roaming in Europe and a 24-month contract. Unused "
            "data does not carry over to the next month."
        ),
        items=("Basic plan", "Plus plan", "Max plan", "Family plan"),
        attributes=(
            Attribute("How much does the {item} cost per month?", ("What is the monthly price of the {item}?", "What's the monthly fee for the {item}?")),
            Attribute("How much data does the {item} include?", ("How much data comes with the {item}?", "What data allowance does the {item} have?")),
            Attribute("Does the {item} include roaming?", ("Is roaming included in the {item}?", "Can I use roaming with the {item}?")),
            Attribute("How long is the contract of the {item}?", ("What is the contract length of the {item}?", "How long is the {item} contract?")),
        ),
    ),
    Document(
        name="gym",
        text=(
            "Fabrikam Fitness memberships. The Off-Peak membership costs 19 pounds a month, gives access "
            "from 10 am to 4 pm on weekdays, includes no classes and has a 10 pound joining fee. The "
            "Standard membership costs 35 pounds a month, gives access from 6 am to 10 pm every day, "
            "includes two classes a week and has a 20 pound joining fee. The Premium membership costs 55 "
            "pounds a month, gives access around the clock, includes unlimited classes and has no joining "
            "fee. The Student membership costs 22 pounds a month, gives the same access as Standard, "
            "includes one class a week and has no joining fee."
        ),
        items=("Off-Peak membership", "Standard membership", "Premium membership", "Student membership"),
        attributes=(
            Attribute("How much does the {item} cost?", ("What is the price of the {item}?", "What's the monthly cost of the {item}?")),
            Attribute("When can I use the gym with the {item}?", ("What are the opening hours for the {item}?", "At what times does the {item} give access?")),
            Attribute("Which classes are included in the {item}?", ("What classes does the {item} include?", "Does the {item} include classes?")),
            Attribute("Is there a joining fee for the {item}?", ("Does the {item} have a joining fee?", "What is the joining fee of the {item}?")),
        ),
    ),
    Document(
        name="software",
        text=(
            "Tailspin Studio software licences. The Solo licence costs 120 dollars a year for one seat, "
            "with updates for one year and community support. The Studio licence costs 450 dollars a "
            "year for five seats, with updates for two years and email support. The Agency licence costs "
            "1,500 dollars a year for twenty seats, with lifetime updates and priority support. The Campus "
            "licence costs 900 dollars a year for up to 200 student seats, with updates for one year and "
            "email support. Licences renew automatically unless cancelled 30 days before renewal."
        ),
        items=("Solo licence", "Studio licence", "Agency licence", "Campus licence"),
        attributes=(
            Attribute("How much does the {item} cost?", ("What is the price of the {item}?", "What's the yearly cost of the {item}?")),
            Attribute("How many seats does the {item} include?", ("How many seats come with the {item}?", "For how many seats is the {item}?")),
            Attribute("How long do updates last with the {item}?", ("For how long does the {item} get updates?", "How long are updates included with the {item}?")),
            Attribute("What support comes with the {item}?", ("What kind of support does the {item} include?", "Which support is included with the {item}?")),
        ),
    ),
)


@dataclass(frozen=True)
class Question:
    """One distinct question: its document and its three wordings (the first is the original)."""

    key: int
    document: Document
    wordings: tuple[str, str, str]

    @property
    def system(self) -> str:
        return SYSTEM.format(document=self.document.text)


@dataclass(frozen=True)
class Ask:
    """One request of a run: which question, in which wording, and whether it was asked before."""

    question: Question
    wording: int
    repeat: bool

    @property
    def text(self) -> str:
        return self.question.wordings[self.wording]


def questions() -> list[Question]:
    out = []
    for document in DOCUMENTS:
        for attribute in document.attributes:
            for item in document.items:
                wordings = (attribute.question, *attribute.paraphrases)
                out.append(Question(len(out), document, tuple(w.format(item=item) for w in wordings)))  # type: ignore[arg-type]
    return out


def sequence(total: int, new_share: float, *, gap: int = 0, seed: int = 11) -> list[Ask]:
    """`total` requests: `new_share` of them first askings, the others repeats (exact or reworded).

    A repeat is of a question first asked at least `gap` requests before it: with `gap` at least
    the number of concurrent users, that question has been answered by the time it comes again, as
    repeats in real traffic come minutes after the original, not in the same second. So the run
    starts with first askings only and then mixes them in at random, `new_share` in all.
    """
    rng = random.Random(seed)
    pool = questions()
    rng.shuffle(pool)
    fresh = round(total * new_share)
    if fresh > len(pool):
        raise ValueError(f"{fresh} new questions wanted, {len(pool)} exist")
    first_asked: dict[int, int] = {}
    asked: list[Question] = []
    asks = []
    for position in range(total):
        left = fresh - len(asked)
        eligible = [q for q in asked if first_asked[q.key] <= position - gap]
        new = left > 0 and (not eligible or left >= total - position or rng.random() < left / (total - position))
        if new:
            question = pool[len(asked)]
            first_asked[question.key] = position
            asked.append(question)
            asks.append(Ask(question, 0, repeat=False))
        else:
            question = rng.choice(eligible or asked)
            wording = 0 if rng.random() < 0.5 else rng.choice((1, 2))
            asks.append(Ask(question, wording, repeat=True))
    return asks
