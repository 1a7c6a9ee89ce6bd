"""Verification of semantic cache candidates: does a near-identical prompt ask the same thing?

Sentence embeddings put "100 USD to EUR" and "100 EUR to USD", or "refundable" and
"non-refundable", at a cosine of 0.97-0.99, above most honest paraphrases. A candidate that passed
the similarity threshold is therefore compared with the incoming prompt word by word, and refused
when the two differ in a way that changes the right answer:

1. numbers, dates, times and units (NUMBER): every number is read into a canonical value
   ("1,000", "1k", "one thousand" -> 1000; "7 pm" -> 19:00; "March 15, 2024" -> 2024-03-15),
   every unit into a canonical unit ("kilometres", "km" -> km; "$", "dollars", "USD" -> usd), plus
   weekdays, months, seasons, frequencies and relative days ("tomorrow", "next week", "daily").
   The multisets must match, and so must the pairing of numbers with units: "100 USD in EUR" and
   "convert 100 EUR to USD" hold the same numbers and units but not the same quantity (ORDER).
2. polarity (NEGATION, ANTONYM): explicit negation cues ("not", "n't", "never", "no", "without",
   "X-free"), prefix negation of a word present in the other prompt ("refundable" /
   "non-refundable", "legal" / "illegal", "agree" / "disagree", "useful" / "useless"), and opposite
   words from a lexicon (start / end, maximum / minimum, buy / sell, tenant / landlord ...). A
   negation balanced by an opposite word is a paraphrase ("not allowed" / "forbidden", "forgot" /
   "can't remember"); any other imbalance is a refusal.
3. named entities (ENTITY): capitalized words that are not sentence-initial common words, acronyms,
   CamelCase and product names. One prompt naming an entity the other lacks, while the other names
   one the first lacks, is a substitution ("Acme" / "Globex"). Acronyms match their expansion
   ("US" / "United States"); an entity present on one side only (an added qualifier) is allowed.
4. order (ORDER), two ways. Role exchange: two words that trade what precedes them, however the
   rest is worded ("from Tokyo to Sydney" / "the flight from Sydney to Tokyo", "can a landlord
   evict a tenant" / "is a tenant allowed to evict the landlord", "Rust than Go" / "Go than Rust").
   Frame swap: exchanging two words of one prompt turns it into the other ("Subtract 7 from 20" /
   "Subtract 20 from 7"). Exchanges across a symmetric connector ("X and Y", "X or Y", "X vs Y") and
   a modifier moving next to its noun ("inflation in economics" / "economic inflation") are allowed.

Everything here is pure and deterministic; `verify` takes well under a millisecond for a short
prompt. The lexicons are general English, not the test data: see tests/cache/test_verification.py
for prompts the rules were not tuned on.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache


class Reason(enum.IntEnum):
    """Why a candidate was refused; the values are the proto's RejectionReason numbers."""

    NUMBER = 1
    NEGATION = 2
    ORDER = 3
    ENTITY = 4
    ANTONYM = 5
    OTHER = 6


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing a prompt with a candidate's prompt."""

    accepted: bool
    reason: Reason | None = None
    # The words or values that differ, short enough for a log line (never a whole prompt).
    detail: str = ""


ACCEPTED = Verdict(True)
# The order check compares token sequences pairwise; longer prompts skip it (their embeddings are
# dominated by the shared text anyway, and a swap of two words is then not a reliable signal).
_MAX_ORDER_TOKENS = 200
_DETAIL_CHARS = 120

# ---------------------------------------------------------------------------------------------
# Lexicons
# ---------------------------------------------------------------------------------------------

_SMALL_NUMBERS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "dozen": 12, "half": 0.5, "quarter": 0.25, "twice": 2, "thrice": 3, "double": 2, "triple": 3,
}  # fmt: skip
# "one" / "a" / "an" are left out on purpose: "a week" and "one week" are the same request.
_ORDINALS = {
    "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13, "fourteenth": 14,
    "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18, "nineteenth": 19,
    "twentieth": 20, "thirtieth": 30, "hundredth": 100,
}  # fmt: skip
# "first" is not an ordinal number here: first / last is an antonym pair.
_MULTIPLIERS = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000,
                "trillion": 1_000_000_000_000}  # fmt: skip
_ADJACENT_MULTIPLIERS = {"k": 1_000, "K": 1_000, "M": 1_000_000, "mn": 1_000_000, "bn": 1_000_000_000,
                         "B": 1_000_000_000}  # fmt: skip
_ORDINAL_SUFFIXES = {"st", "nd", "rd", "th"}

# Units that mean something without a number ("convert Celsius to Fahrenheit", "in miles").
_UNITS = {
    # currency
    "usd": "usd", "dollar": "usd", "dollars": "usd", "$": "usd", "buck": "usd", "bucks": "usd",
    "eur": "eur", "euro": "eur", "euros": "eur", "€": "eur",
    "gbp": "gbp", "£": "gbp", "sterling": "gbp",
    "jpy": "jpy", "yen": "jpy", "¥": "jpy", "cny": "cny", "rmb": "cny", "yuan": "cny",
    "inr": "inr", "rupee": "inr", "rupees": "inr", "chf": "chf", "franc": "chf", "francs": "chf",
    "cad": "cad", "aud": "aud", "sek": "sek", "nok": "nok", "dkk": "dkk", "krona": "sek", "krone": "nok",
    "btc": "btc", "bitcoin": "btc", "eth": "eth", "ether": "eth", "rub": "rub", "ruble": "rub",
    "mxn": "mxn", "peso": "mxn", "pesos": "mxn", "brl": "brl", "real": "brl", "reais": "brl",
    # length
    "km": "km", "kms": "km", "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km",
    "m": "m", "meter": "m", "meters": "m", "metre": "m", "metres": "m",
    "cm": "cm", "centimeter": "cm", "centimeters": "cm", "centimetre": "cm", "centimetres": "cm",
    "mm": "mm", "millimeter": "mm", "millimeters": "mm", "millimetre": "mm", "millimetres": "mm",
    "mile": "mile", "miles": "mile", "mi": "mile", "ft": "ft", "foot": "ft", "feet": "ft",
    "inch": "inch", "inches": "inch", "yard": "yard", "yards": "yard", "yd": "yard",
    "nm": "nm", "nanometer": "nm", "nanometers": "nm",
    # mass
    "kg": "kg", "kgs": "kg", "kilogram": "kg", "kilograms": "kg", "kilo": "kg", "kilos": "kg",
    "g": "g", "gram": "g", "grams": "g", "gr": "g", "mg": "mg", "milligram": "mg", "milligrams": "mg",
    "mcg": "mcg", "microgram": "mcg", "micrograms": "mcg",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb", "oz": "oz", "ounce": "oz", "ounces": "oz",
    "ton": "t", "tons": "t", "tonne": "t", "tonnes": "t", "stone": "st",
    # volume
    "l": "l", "liter": "l", "liters": "l", "litre": "l", "litres": "l",
    "ml": "ml", "milliliter": "ml", "milliliters": "ml", "millilitre": "ml", "millilitres": "ml",
    "gallon": "gal", "gallons": "gal", "gal": "gal", "pint": "pint", "pints": "pint",
    "quart": "quart", "quarts": "quart", "floz": "floz", "cup": "cup", "cups": "cup",
    "tablespoon": "tbsp", "tablespoons": "tbsp", "tbsp": "tbsp", "teaspoon": "tsp", "teaspoons": "tsp",
    "tsp": "tsp",
    # temperature
    "celsius": "celsius", "centigrade": "celsius", "fahrenheit": "fahrenheit", "kelvin": "kelvin",
    # data, energy, power, speed, frequency
    "b": "byte", "byte": "byte", "bytes": "byte", "kb": "kb", "kib": "kb", "mb": "mb", "mib": "mb",
    "gb": "gb", "gib": "gb", "tb": "tb", "tib": "tb", "pb": "pb", "bit": "bit", "bits": "bit",
    "mbps": "mbps", "gbps": "gbps", "kbps": "kbps",
    "kwh": "kwh", "kw": "kw", "watt": "w", "watts": "w", "w": "w", "volt": "v", "volts": "v", "v": "v",
    "amp": "a", "amps": "a", "mah": "mah", "joule": "j", "joules": "j", "kcal": "kcal",
    "hz": "hz", "khz": "khz", "mhz": "mhz", "ghz": "ghz",
    "mph": "mph", "kph": "kph", "kmh": "kph", "knot": "knot", "knots": "knot",
    "%": "%", "percent": "%", "percentage": "%", "pct": "%", "bps": "bp", "x": "x",
    "acre": "acre", "acres": "acre", "hectare": "ha", "hectares": "ha", "ha": "ha",
    "sqm": "m2", "sqft": "ft2",
}  # fmt: skip
# Units counted only right after a number ("3 days", "10-minute"): alone they are ordinary words
# ("how many minutes", "what year").
_ATTACHED_UNITS = {
    "second": "s", "seconds": "s", "sec": "s", "secs": "s", "s": "s",
    "minute": "min", "minutes": "min", "min": "min", "mins": "min",
    "hour": "h", "hours": "h", "hr": "h", "hrs": "h", "h": "h",
    "day": "day", "days": "day", "week": "week", "weeks": "week",
    "month": "month", "months": "month", "year": "year", "years": "year", "yr": "year", "yrs": "year",
    "decade": "decade", "decades": "decade", "century": "century", "centuries": "century",
    "ms": "ms", "millisecond": "ms", "milliseconds": "ms",
}  # fmt: skip

_MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4,
    "may": 5, "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9,
    "sep": 9, "sept": 9, "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12, "dec": 12,
}  # fmt: skip
# Month names that are also ordinary words count only when capitalized mid-sentence or next to a number.
_AMBIGUOUS_MONTHS = {
    "may",
    "march",
    "mar",
    "jan",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
    "apr",
    "feb",
}
_WEEKDAYS = {
    "monday": "mon", "mon": "mon", "tuesday": "tue", "tue": "tue", "tues": "tue", "wednesday": "wed",
    "wed": "wed", "thursday": "thu", "thu": "thu", "thurs": "thu", "friday": "fri", "fri": "fri",
    "saturday": "sat", "sat": "sat", "sunday": "sun", "sun": "sun",
    "weekday": "weekday", "weekdays": "weekday", "weekend": "weekend", "weekends": "weekend",
}  # fmt: skip
_SHORT_WEEKDAYS = {"mon", "tue", "tues", "wed", "thu", "thurs", "fri", "sat", "sun"}
# Unit abbreviations of two letters that are not also common words.
_SHORT_STANDALONE_UNITS = {"km", "kg", "cm", "mm", "ml", "oz", "lb", "ft", "gb", "tb", "mb", "kb", "nm"}
_FREQUENCIES = {"hourly": "hour", "daily": "day", "nightly": "day", "weekly": "week", "biweekly": "2week",
                "fortnightly": "2week", "monthly": "month", "quarterly": "quarter", "yearly": "year",
                "annually": "year", "annual": "year"}  # fmt: skip
_SEASONS = {"spring": "spring", "summer": "summer", "autumn": "autumn", "fall": "autumn", "winter": "winter"}
_RELATIVE_DAYS = {"today": "d+0", "tonight": "d+0n", "tomorrow": "d+1", "yesterday": "d-1", "now": "d+0"}
_DEICTIC = {"this": "this", "next": "next", "last": "last", "previous": "last", "coming": "next",
            "past": "last", "upcoming": "next", "current": "this"}  # fmt: skip
_PERIODS = {"week", "weekend", "month", "year", "quarter", "season", "semester", "decade", "century",
            "morning", "afternoon", "evening", "night", "summer", "winter", "spring", "autumn", "fall",
            *[w for w in _WEEKDAYS if w not in _SHORT_WEEKDAYS]}  # fmt: skip

_NEGATION_CUES = {"not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere",
                  "without", "cannot", "cant", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt",
                  "werent", "wont", "wouldnt", "shouldnt", "couldnt", "mustnt", "hasnt", "havent",
                  "hadnt", "aint", "neednt", "unable", "lack", "lacks", "lacking"}  # fmt: skip
# "fail to X" means "not X".
_NEGATING_VERBS = {"fail", "fails", "failed", "failing"}
# Compounds "X-free" / "Xless" that mean "without X".
_PRIVATIVE_SUFFIXES = ("free",)
_NEGATING_PREFIXES = ("non", "un", "in", "im", "il", "ir", "dis", "mis", "a")
# Pairs that look like prefix negation but are different words.
_FALSE_PREFIX_PAIRS = {
    "inform", "input", "income", "inside", "intend", "invent", "install", "insure", "indoor", "index",
    "invest", "inset", "insight", "inject", "infix", "inline", "inlet", "inland", "inbound", "infield",
    "inflow", "impress", "import", "impose", "impart", "impact", "impair", "implant", "impound",
    "imprint", "irate", "dispose", "discount", "discover", "disease", "display", "dispatch", "dismiss",
    "distance", "distill", "dissent", "discharge", "discuss", "dispense", "disperse", "district",
    "dispute", "disport", "distress", "unit", "union", "unite", "universe", "uncle", "under", "undo",
    "untold", "unto", "until", "mister", "mislay", "missing", "mission", "missive", "amass", "amend",
    "amount", "apart", "aside", "afoot", "ahead", "alone", "aloud", "along", "among", "around",
    "arise", "avow", "await", "awake", "aware", "away", "abed", "aboard", "about", "above", "across",
    "adjust", "affirm", "afresh", "again", "against", "agree", "allot", "allow", "alight", "alike",
    "amid", "anew", "annex", "appoint", "approve", "arrange", "ascribe", "assign", "assort", "atone",
    "attire", "avert", "award", "illegible",
}  # fmt: skip
_MIN_PREFIX_STEM = {"a": 6, "in": 4, "im": 4, "il": 4, "ir": 4, "un": 3, "non": 3, "dis": 4, "mis": 4}

# Opposites: each entry is (one side, the other side); words on one side are interchangeable.
# Inflections (plural, -ed, -ing, -er, -est) are generated. Prefix negations ("unlock") are left
# to the prefix rule and must not appear here.
_ANTONYMS: Sequence[tuple[str, str]] = (
    ("start begin commence launch kickoff onset beginning", "end finish stop conclude terminate ending"),
    ("open opening reopen", "close closed shut closing"),
    ("maximum max maximal maximize maximise most", "minimum min minimal minimize minimise least fewest"),
    ("high higher highest", "low lower lowest"),
    (
        "increase raise rise boost grow up-regulate incline inflate",
        "decrease reduce lower cut drop decline fall shrink deflate",
    ),
    ("up upward upwards uphill upstairs", "down downward downwards downhill downstairs"),
    ("above over upper top", "below under beneath lower bottom"),
    ("before prior pre earlier ahead", "after post later afterwards"),
    ("early earliest", "late latest"),
    ("first", "last final"),
    ("past previous", "next future upcoming"),
    ("enable activate turn_on switch_on power_on", "disable deactivate turn_off switch_off power_off"),
    ("buy purchase", "sell"),
    ("import", "export"),
    ("upload", "download"),
    ("push", "pull"),
    ("send", "receive"),
    ("sender", "recipient receiver"),
    ("encrypt encryption", "decrypt decryption"),
    ("encode encoding", "decode decoding"),
    ("serialize serialise", "deserialize deserialise"),
    ("compress compression", "decompress decompression"),
    ("add insert append", "remove delete subtract"),
    ("include inclusive", "exclude exclusive"),
    ("inside internal inner interior indoor", "outside external outer exterior outdoor"),
    ("inbound incoming ingress", "outbound outgoing egress"),
    ("input", "output"),
    ("left", "right"),
    ("north northern", "south southern"),
    ("east eastern", "west western"),
    ("best", "worst"),
    ("better improve", "worse worsen"),
    ("good beneficial", "bad harmful harm"),
    ("strong strength", "weak weakness"),
    ("hot warm heat", "cold cool chill"),
    ("heavy", "light lightweight"),
    ("dark", "bright"),
    ("fast quick rapid speedy speedup speed_up accelerate", "slow slowdown slow_down decelerate"),
    ("easy simple", "hard difficult"),
    ("cheap inexpensive affordable", "expensive costly pricey"),
    ("big large huge giant", "small little tiny"),
    ("long", "short"),
    ("tall", "short"),
    ("wide broad", "narrow"),
    ("thick", "thin"),
    ("deep", "shallow"),
    ("young youth", "old elderly"),
    ("new", "old"),
    ("gain", "lose loss"),
    ("win victory winner", "lose defeat loser"),
    ("profit", "loss"),
    ("accept approve allow permit grant", "reject decline refuse deny forbid ban prohibit"),
    ("pro pros advantage benefit upside", "con cons disadvantage drawback downside"),
    ("for favor favour", "against"),
    ("dense", "airy fluffy"),
    ("positive", "negative"),
    ("true", "false"),
    ("correct right", "wrong"),
    ("success succeed pass", "failure fail"),
    ("love like", "hate"),
    ("happy", "sad unhappy"),
    ("rich wealthy", "poor"),
    ("full", "empty"),
    ("wet", "dry"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("soft", "hard firm"),
    ("remember", "forget forgot forgotten"),
    ("arrive arrival", "depart departure leave"),
    ("enter entry entrance", "exit"),
    ("expand", "collapse"),
    ("zoom_in", "zoom_out"),
    (
        "log_in login sign_in signin check_in opt_in plug_in",
        "log_out logout sign_out signout check_out opt_out",
    ),
    ("boil boiling melt melting", "freeze freezing"),
    ("tighten", "loosen"),
    ("attack offense offence", "defend defense defence"),
    ("borrow borrower", "lend lender"),
    ("debtor", "creditor"),
    ("tenant renter lessee", "landlord landlady lessor"),
    ("buyer purchaser", "seller vendor"),
    ("employer", "employee"),
    ("plaintiff prosecution", "defendant defense"),
    ("parent", "child kid"),
    ("adult grownup", "child kid minor infant toddler baby"),
    ("husband", "wife"),
    ("father dad", "mother mom mum"),
    ("son", "daughter"),
    ("brother", "sister"),
    ("male man boy", "female woman girl"),
    ("king", "queen"),
    ("teacher", "student pupil"),
    ("doctor physician", "patient"),
    ("host", "guest"),
    ("client", "server"),
    ("frontend front-end", "backend back-end"),
    ("public", "private"),
    ("global", "local"),
    ("static", "dynamic"),
    ("synchronous sync", "asynchronous async"),
    ("horizontal", "vertical"),
    ("uppercase capital", "lowercase"),
    ("ascending asc", "descending desc"),
    ("read", "write"),
    ("plus sum", "minus"),
    ("multiply multiplication", "divide division"),
    ("odd", "even"),
    ("singular", "plural"),
    ("raw uncooked", "cooked"),
    ("online", "offline"),
    ("wired", "wireless"),
    ("manual manually", "automatic automatically"),
    ("permanent permanently", "temporary temporarily"),
    ("remote", "onsite on-site"),
    ("inflation", "deflation"),
    ("bull bullish", "bear bearish"),
    ("credit", "debit"),
    ("asset", "liability"),
    ("surplus", "deficit"),
    ("acid acidic", "alkaline base basic"),
    ("anode", "cathode"),
    ("sunrise", "sunset"),
    ("morning", "evening night"),
    ("day daytime", "night nighttime"),
    ("summer", "winter"),
    ("same identical similar", "different"),
    ("more", "less fewer"),
    ("always", "never"),
    ("all everyone everything", "none nobody nothing"),
    ("safe safety", "dangerous risky"),
    ("healthy", "harmful"),
    ("legal lawful legitimate", "illegal unlawful illegitimate criminal"),
    ("friend ally", "enemy foe"),
    ("top", "bottom"),
    ("front", "rear"),
    ("inhale", "exhale"),
    ("lift", "drop"),
    ("attach", "detach"),
    ("connect", "disconnect"),
    ("ally", "opponent"),
    ("miss", "catch attend hit"),
    ("majority", "minority"),
    ("superior", "inferior"),
    ("optimist optimistic", "pessimist pessimistic"),
    ("import", "export"),
)

# Words that start a sentence without being names; a capitalized sentence-initial word not listed
# here is taken as a name ("Acme's revenue ...").
_COMMON_WORDS = set(
    """
    a about above according actually add after again against all also although always am among an
    analyze analyse and another any anyone anything are as ask assume at be because been before being
    below best better between both brainstorm briefly build but by calculate can cannot check choose
    classify clarify compare compose compute consider convert correct could count create critique
    currently dear debug define derive describe design detail determine did do does doing don draft
    draw during each edit elaborate else emulate estimate evaluate even ever every example explain
    express extract few find fix for format from generate get give go good got guide had has have having
    he hello help her here hey hi his how however i i'd i'll i'm i've identify if imagine implement
    improve in including instead is it it's its just kindly know last let let's list look make many
    may maybe me might more most much must my name need never new next no not now of off often ok okay
    on once one only or other our out outline over paraphrase people per perhaps pick plan please
    predict prepare provide prove quick quickly quote rank rate really recommend refactor regarding
    rephrase replace respond review rewrite right same say schedule search see send set several she
    should show simplify since sketch so solve some someone something sometimes sort specifically
    still suggest summarise summarize suppose sure take teach tell than thank thanks that the their them
    then there these they think this those though through to today tomorrow translate true try
    two under unless until up us use using usually very walk want was we well were what what's whats
    when where whether which while who whom whose why will with within without would write yes yet
    you your yours continue consider according assuming given based following why's how's where's
    who's when's there's here's that's is there're isn't aren't can't don't doesn't didn't won't
    wouldn't shouldn't couldn't hi also besides next finally first second third lastly overall
    in-depth step steps short long simple detailed brief approximately roughly exactly generally
    typically tips ideas ways reasons fun good great best quick honest
    """.split()
)
# Small words the order check ignores (they move around freely in paraphrases).
_ORDER_STOPWORDS = set(
    """
    a an the is are was were be been being am do does did doing can could should would will shall may
    might must i me my mine we us our you your it its this that these those there here how what which
    why when where who whom please just really very some any so also then there's it's i'm what's
    let let's tell give show explain to
    """.split()
) - {"to"}
# Words skipped when looking for what precedes a word ("from [the] server"), and words that mark no
# role (a sentence start, an auxiliary, a question word, a pronoun): both are "nothing" as context.
_CONTEXT_SKIP = {"the", "a", "an", "my", "your", "his", "her", "its", "our", "their", "this", "that", "these",
                 "those", "some", "any", "one", "another"}  # fmt: skip
_NO_ROLE = {"is", "are", "was", "were", "be", "been", "am", "can", "could", "should", "would", "will", "shall",
            "may", "might", "must", "does", "do", "did", "what", "how", "which", "why", "when", "where", "who",
            "whom", "i", "you", "we", "they", "he", "she", "it", "me", "us", "them", ",", "&", "please", "if",
            "whether", "and", "or"}  # fmt: skip
_SYMMETRIC_CONNECTORS = {"and", "or", "vs", "versus", "&", ",", "plus", "nor"}
_ACRONYM_SKIP = {"of", "the", "and", "for", "a", "an", "&", "de", "la"}

# ---------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<isodate>\d{4}-\d{1,2}-\d{1,2})
    |(?P<slashdate>\d{1,2}/\d{1,2}/\d{2,4})
    |(?P<time>\d{1,2}(?::\d{2})?\s*(?:a\.?m\.?|p\.?m\.?)(?![a-z])|\d{1,2}:\d{2}(?::\d{2})?)
    |(?P<frac>\d{1,2}/\d{1,2}(?![/\d]))
    |(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)*|\.\d+)
    |(?P<word>[^\W\d_]+(?:['\-][^\W\d_]+)*)
    |(?P<sym>[$€£¥%&,])
    |(?P<stop>[.!?;:\n])
    """,
    re.VERBOSE | re.IGNORECASE,
)
_PRE_SUBSTITUTIONS = (
    (re.compile(r"[’‘`´]"), "'"),
    (re.compile(r"[“”]"), '"'),
    (re.compile(r"[‐‑‒–—]"), "-"),
    (re.compile(r"\bkm\s*/\s*h\b", re.I), " kph "),
    (re.compile(r"\bmi\s*/\s*h\b", re.I), " mph "),
    (re.compile(r"°\s*C\b"), " celsius "),
    (re.compile(r"°\s*F\b"), " fahrenheit "),
    (re.compile(r"°\s*K\b"), " kelvin "),
    (re.compile(r"°"), " degrees "),
    (re.compile(r"\bfl\.?\s*oz\b", re.I), " floz "),
    (re.compile(r"\b(?:US|U\.S\.|American)\s+dollars?\b", re.I), " usd "),
    (re.compile(r"\bCanadian\s+dollars?\b", re.I), " cad "),
    (re.compile(r"\bAustralian\s+dollars?\b", re.I), " aud "),
    (re.compile(r"\bSwiss\s+francs?\b", re.I), " chf "),
    (re.compile(r"\bBritish\s+pounds?\b|\bpounds?\s+sterling\b", re.I), " gbp "),
    (re.compile(r"\bJapanese\s+yen\b", re.I), " jpy "),
    (re.compile(r"\b(?:[A-Z]\.){2,}"), lambda m: m.group(0).replace(".", "") + " "),
    (re.compile(r"\bsq\.?\s*(?:m|meters?|metres?)\b", re.I), " sqm "),
    (re.compile(r"\bsq\.?\s*(?:ft|feet|foot)\b", re.I), " sqft "),
)
_ROMAN = re.compile(r"^(?=[IVX]{2,})X{0,3}(?:IX|IV|V?I{0,3})$")
_CONTRACTIONS = {"can't": "cannot", "won't": "wont", "shan't": "shant"}


@dataclass(frozen=True)
class _Token:
    kind: str  # word | num | isodate | slashdate | time | sym | stop
    text: str  # as written
    start: int
    end: int
    sentence_initial: bool


def _tokenize(text: str) -> list[_Token]:
    for pattern, replacement in _PRE_SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    tokens: list[_Token] = []
    initial = True
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "word"
        value = match.group(0)
        if kind == "stop":
            initial = True
            tokens.append(_Token("stop", value, match.start(), match.end(), False))
            continue
        tokens.append(_Token(kind, value, match.start(), match.end(), initial))
        if kind != "sym" or value not in "$€£¥":
            initial = False
    return tokens


def _split_word(text: str) -> list[tuple[str, bool]]:
    """A written word as (part, privative) pieces: "sugar-free" -> sugar, free(privative)."""
    word = text
    lower = word.lower()
    if lower in _CONTRACTIONS:
        return [(_CONTRACTIONS[lower], False)]
    if lower.endswith("n't"):
        return [(lower[:-3] + "nt", False)]
    if lower.endswith("'s") or lower.endswith("s'"):
        word = word[:-2] if lower.endswith("'s") else word[:-1]
    elif "'" in word:
        word = word.split("'")[0]
    parts = [p for p in word.split("-") if p]
    if len(parts) >= 2 and parts[0].lower() in _NEGATING_PREFIXES:
        parts = [parts[0] + parts[1], *parts[2:]]
    pieces = []
    for i, part in enumerate(parts):
        privative = i > 0 and part.lower() in _PRIVATIVE_SUFFIXES
        pieces.append((part, privative))
    return pieces


def _singular(word: str) -> str:
    """A light plural folding, the same for both prompts ("processes" -> "process")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "'s")):
        return word[:-1]
    return word


# ---------------------------------------------------------------------------------------------
# Antonym forms
# ---------------------------------------------------------------------------------------------

_VOWELS = set("aeiou")


def _inflections(word: str) -> set[str]:
    forms = {word}
    if "_" in word or "-" in word:
        return forms
    forms |= {word + "s", word + "es", word + "ed", word + "d", word + "ing", word + "er", word + "est",
              word + "r", word + "st", word + "ly"}  # fmt: skip
    if word.endswith("e"):
        forms |= {word[:-1] + "ing", word[:-1] + "ed", word[:-1] + "er", word[:-1] + "est"}
    if word.endswith("y") and len(word) > 2 and word[-2] not in _VOWELS:
        forms |= {
            word[:-1] + "ies",
            word[:-1] + "ied",
            word[:-1] + "ier",
            word[:-1] + "iest",
            word[:-1] + "ily",
        }
    if (
        len(word) >= 3
        and word[-1] not in _VOWELS | {"w", "x", "y"}
        and word[-2] in _VOWELS
        and word[-3] not in _VOWELS
    ):
        double = word + word[-1]
        forms |= {double + "ing", double + "ed", double + "er", double + "est"}
    return forms


_IRREGULAR = {
    "rose": "rise", "risen": "rise", "fell": "fall", "fallen": "fall", "sold": "sell", "bought": "buy",
    "began": "begin", "begun": "begin", "won": "win", "lost": "lose", "sent": "send", "left": "leave",
    "forgot": "forget", "forgotten": "forget", "grew": "grow", "shrank": "shrink", "froze": "freeze",
    "frozen": "freeze", "wrote": "write", "written": "write", "better": "better", "worse": "worse",
    "lent": "lend", "forbidden": "forbid", "forbade": "forbid",
    "men": "man", "women": "woman", "children": "child", "kids": "kid",
    "wives": "wife", "taller": "tall", "shut": "shut", "cut": "cut", "hit": "hit", "caught": "catch",
}  # fmt: skip


def _build_antonyms() -> dict[str, set[tuple[int, int]]]:
    index: dict[str, set[tuple[int, int]]] = {}
    for group, sides in enumerate(_ANTONYMS):
        for side, words in enumerate(sides):
            for word in words.split():
                for form in _inflections(word):
                    index.setdefault(form, set()).add((group, side))
    # "left" is both a direction and the past of "leave"; keep it a direction.
    for surface, base in _IRREGULAR.items():
        if surface in index:
            continue
        for key in index.get(base, set()).copy():
            index.setdefault(surface, set()).add(key)
    return index


_ANTONYM_INDEX = _build_antonyms()

# ---------------------------------------------------------------------------------------------
# Features of one prompt
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFeatures:
    """What verification compares, read once per prompt."""

    numbers: Counter[str]
    units: frozenset[str]
    quantities: Counter[str]  # "100 usd": which number goes with which unit
    dates: Counter[str]
    negations: tuple[str, ...]
    words: frozenset[str]  # lowercase word pieces, plurals folded
    raw_words: frozenset[str]  # lowercase word pieces as written
    antonym_sides: dict[int, set[int]]
    antonym_words: dict[tuple[int, int], str]
    entities: frozenset[str]
    entity_runs: tuple[tuple[str, ...], ...]  # consecutive capitalized words, lowercase
    all_words_seq: tuple[str, ...]  # every lowercase word piece in order (acronym matching)
    order_seq: tuple[str, ...]
    full_seq: tuple[str, ...]  # order tokens with stopwords kept, to look between two tokens


def _number_text(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(round(value, 10))


def _parse_number(text: str) -> str:
    """Canonical text of a written number: thousands separators out, decimals kept as written."""
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    if text.count(".") > 1:  # a version such as 1.2.3
        return ".".join(str(int(p)) for p in text.split("."))
    if "." in text:
        whole, _, frac = text.partition(".")
        return f"{int(whole or 0)}.{frac}"
    return str(int(text))


def _time_text(text: str) -> str:
    match = re.match(r"(\d{1,2})(?::(\d{2}))?(?::\d{2})?\s*([ap])?", text.lower())
    assert match is not None
    hour, minute, half = int(match.group(1)), int(match.group(2) or 0), match.group(3)
    if half == "p" and hour < 12:
        hour += 12
    if half == "a" and hour == 12:
        hour = 0
    return f"{hour:02d}:{minute:02d}"


@dataclass
class _Item:
    """One token after word splitting."""

    kind: str  # word | num | date | time | sym | stop
    text: str  # as written (word piece)
    lower: str
    start: int
    end: int
    initial: bool
    privative: bool = False


def _items(tokens: list[_Token]) -> list[_Item]:
    items: list[_Item] = []
    for token in tokens:
        if token.kind == "word":
            pieces = _split_word(token.text)
            for i, (piece, privative) in enumerate(pieces):
                items.append(
                    _Item("word", piece, piece.lower(), token.start, token.end, token.sentence_initial and i == 0,
                          privative)
                )  # fmt: skip
            if len(pieces) == 1 and token.text.lower().endswith(("'s", "s'")) and "n't" not in token.text:
                items.append(_Item("poss", "'s", "'s", token.end, token.end, False))
        elif token.kind == "frac":
            top, bottom = (int(p) for p in token.text.split("/"))
            if 0 < top < bottom <= 16:
                items.append(
                    _Item(
                        "num", _number_text(top / bottom), "", token.start, token.end, token.sentence_initial
                    )
                )
            else:  # "24/7", "140/90": two numbers
                left, right = token.text.split("/")
                items.append(
                    _Item("num", left, "", token.start, token.start + len(left), token.sentence_initial)
                )
                items.append(_Item("num", right, "", token.end - len(right), token.end, False))
        elif token.kind in ("isodate", "slashdate"):
            items.append(
                _Item("date", token.text, token.text, token.start, token.end, token.sentence_initial)
            )
        else:
            items.append(_Item(token.kind, token.text, token.text.lower(), token.start, token.end,
                               token.sentence_initial))  # fmt: skip
    return items


def _is_month(items: list[_Item], i: int) -> int | None:
    item = items[i]
    month = _MONTHS.get(item.lower)
    if month is None:
        return None
    if item.lower in _AMBIGUOUS_MONTHS:
        near_number = any(
            0 <= j < len(items) and items[j].kind == "num" for j in (i - 1, i + 1, i - 2, i + 2)
        )
        capitalized_mid = item.text[:1].isupper() and not item.initial
        if not (near_number or capitalized_mid):
            return None
    return month


def _extract_quantities(
    items: list[_Item],
) -> tuple[Counter[str], set[str], Counter[str], Counter[str], set[int]]:
    """Numbers, units, dates and quantities (a number with its unit: "100 usd"); also the indexes
    of the items consumed (not words for the other checks)."""
    quantities: Counter[str] = Counter()
    numbers: Counter[str] = Counter()
    units: set[str] = set()
    dates: Counter[str] = Counter()
    used: set[int] = set()
    n = len(items)
    i = 0
    while i < n:
        item = items[i]
        if item.kind == "date":
            if "-" in item.text:
                y, m, d = (int(p) for p in item.text.split("-"))
            else:
                m, d, y = (int(p) for p in item.text.split("/"))
                y = y + 2000 if y < 100 else y
            dates[f"{y:04d}-{m:02d}-{d:02d}"] += 1
            used.add(i)
        elif item.kind == "time":
            dates["t" + _time_text(item.text)] += 1
            used.add(i)
        elif item.kind == "num":
            value = _parse_number(item.text)
            nxt = items[i + 1] if i + 1 < n else None
            adjacent = nxt is not None and nxt.start == item.end
            j = i + 1
            if adjacent and nxt is not None and nxt.kind == "word":
                if nxt.text in _ADJACENT_MULTIPLIERS:
                    value = _number_text(float(value) * _ADJACENT_MULTIPLIERS[nxt.text])
                    used.add(i + 1)
                    j = i + 2
                elif nxt.lower in _ORDINAL_SUFFIXES:
                    used.add(i + 1)
                    j = i + 2
            if j < n and items[j].kind == "word" and items[j].lower in _MULTIPLIERS:
                value = _number_text(float(value) * _MULTIPLIERS[items[j].lower])
                used.add(j)
                j += 1
            # "15 March 2024", "4th of July"
            k = j + 1 if j < n and items[j].lower == "of" else j
            month = _is_month(items, k) if k < n else None
            if month is not None and value.isdigit() and 1 <= int(value) <= 31:
                year = ""
                if k + 1 < n and items[k + 1].kind == "num" and len(items[k + 1].text) == 4:
                    year = items[k + 1].text
                    used.add(k + 1)
                dates[f"{year or '----'}-{month:02d}-{int(value):02d}"] += 1
                used.update({i, k} | set(range(i, k + 1)))
                i = k + 2 if year else k + 1
                continue
            numbers[value] += 1
            used.add(i)
            unit_index = j
            if unit_index < n and items[unit_index].lower in ("degree", "degrees"):
                unit_index += 1  # "30 degrees Celsius"
            quantity_unit = ""
            if unit_index < n and items[unit_index].kind in ("word", "sym"):
                word = items[unit_index].lower
                unit = _ATTACHED_UNITS.get(word) or _UNITS.get(word)
                if unit is not None:
                    units.add(unit)
                    used.add(unit_index)
                    quantity_unit = unit
            if not quantity_unit and i > 0 and items[i - 1].kind == "sym" and items[i - 1].text in "$€£¥":
                quantity_unit = _UNITS[items[i - 1].text]  # "$300"
            if quantity_unit:
                quantities[f"{value} {quantity_unit}"] += 1
            i = j
            continue
        elif item.kind == "word":
            month = _is_month(items, i)
            if month is not None:
                # "March 15, 2024", "March 2024"
                nxt = items[i + 1] if i + 1 < n else None
                if nxt is not None and nxt.kind == "num" and nxt.text.isdigit() and 1 <= int(nxt.text) <= 31:
                    j = i + 2
                    if j < n and items[j].lower in _ORDINAL_SUFFIXES and items[j].start == nxt.end:
                        j += 1
                    if j < n and items[j].text == ",":
                        j += 1
                    year = ""
                    if j < n and items[j].kind == "num" and len(items[j].text) == 4:
                        year = items[j].text
                        used.add(j)
                        j += 1
                    dates[f"{year or '----'}-{month:02d}-{int(nxt.text):02d}"] += 1
                    used.update(range(i, j))
                    i = j
                    continue
                if nxt is not None and nxt.kind == "num" and len(nxt.text) == 4:
                    dates[f"{nxt.text}-{month:02d}"] += 1
                    used.update({i, i + 1})
                    i += 2
                    continue
                dates[f"month-{month:02d}"] += 1
                used.add(i)
            elif _weekday(item.lower) and (item.lower not in _SHORT_WEEKDAYS or _near_quantity(items, i)):
                dates["dow-" + _weekday(item.lower)] += 1
                used.add(i)
            elif item.lower in _FREQUENCIES:
                dates["every-" + _FREQUENCIES[item.lower]] += 1
                used.add(i)
            elif item.lower in ("every", "each", "per") and i + 1 < n and _period(items[i + 1].lower):
                dates["every-" + _period(items[i + 1].lower)] += 1
                used.update({i, i + 1})
                i += 2
                continue
            elif item.lower in _RELATIVE_DAYS:
                dates[_RELATIVE_DAYS[item.lower]] += 1
                used.add(i)
            elif item.lower in _DEICTIC and i + 1 < n and items[i + 1].lower.rstrip("s") in _PERIODS:
                period = items[i + 1].lower.rstrip("s")
                dates[f"{_DEICTIC[item.lower]}-{_SEASONS.get(period, period)}"] += 1
                used.update({i, i + 1})
                i += 2
                continue
            elif item.lower in _SEASONS and not (item.lower == "fall" and not item.text[:1].isupper()):
                dates["season-" + _SEASONS[item.lower]] += 1
                used.add(i)
            elif item.lower in _SMALL_NUMBERS or item.lower in _ORDINALS:
                value = float(_SMALL_NUMBERS.get(item.lower, _ORDINALS.get(item.lower, 0)))
                j = i + 1
                # "twenty five", "two hundred", "three million"
                while j < n and items[j].kind == "word" and (
                    items[j].lower in _MULTIPLIERS or (items[j].lower in _SMALL_NUMBERS and value >= 20
                                                       and _SMALL_NUMBERS[items[j].lower] < 10)
                ):  # fmt: skip
                    if items[j].lower in _MULTIPLIERS:
                        value *= _MULTIPLIERS[items[j].lower]
                    else:
                        value += _SMALL_NUMBERS[items[j].lower]
                    j += 1
                if item.lower == "second" and (i > 0 and items[i - 1].kind == "num"):
                    pass  # "1 second" is a unit, handled by the number before it
                else:
                    numbers[_number_text(value)] += 1
                    used.update(range(i, j))
                    if j < n and items[j].kind == "word":
                        unit = _ATTACHED_UNITS.get(items[j].lower) or _UNITS.get(items[j].lower)
                        if unit is not None and items[j].lower not in (
                            "m",
                            "b",
                            "s",
                            "h",
                            "x",
                            "a",
                            "v",
                            "w",
                            "l",
                            "g",
                        ):
                            units.add(unit)
                            used.add(j)
                    i = j
                    continue
            elif item.lower in _MULTIPLIERS and not (i > 0 and items[i - 1].kind == "num"):
                numbers[_number_text(_MULTIPLIERS[item.lower])] += 1
                used.add(i)
            elif (
                item.lower in _UNITS
                and len(item.lower) > 2
                and item.lower not in ("real", "base", "stone", "cup")
            ):
                units.add(_UNITS[item.lower])
                used.add(i)
            elif item.lower in _SHORT_STANDALONE_UNITS:
                units.add(_UNITS[item.lower])
                used.add(i)
            elif _ROMAN.match(item.text) and item.text.isupper():
                numbers[_number_text(_roman_value(item.text))] += 1
                used.add(i)
        elif item.kind == "sym" and item.text in "$€£¥%":
            units.add(_UNITS[item.text])
            used.add(i)
        i += 1
    return numbers, units, dates, quantities, used


def _weekday(word: str) -> str:
    """ "sundays" -> "sun"; "" when the word is no weekday."""
    return _WEEKDAYS.get(word) or (_WEEKDAYS.get(word[:-1], "") if word.endswith("days") else "")


def _period(word: str) -> str:
    word = word[:-1] if word.endswith("s") else word
    return (
        {"night": "day"}.get(word, word) if word in ("hour", "day", "night", "week", "month", "year") else ""
    )


def _near_quantity(items: list[_Item], i: int) -> bool:
    """Whether a number, date or time stands next to item i ("Sat 14:00", "Mon, 3 June")."""
    for j in (i - 1, i + 1, i + 2):
        if 0 <= j < len(items) and items[j].kind in ("num", "date", "time"):
            return True
    return False


def _roman_value(text: str) -> int:
    values = {"I": 1, "V": 5, "X": 10}
    total = 0
    for i, char in enumerate(text):
        value = values[char]
        if i + 1 < len(text) and values[text[i + 1]] > value:
            total -= value
        else:
            total += value
    return total


def _is_entity(item: _Item) -> bool:
    text = item.text
    if not text[:1].isupper() or item.lower in ("i",):
        return False
    has_inner_capital = any(c.isupper() for c in text[1:])
    if text.isupper() and len(text) >= 2:
        return True
    if has_inner_capital:
        return True
    if item.initial:
        return item.lower not in _COMMON_WORDS
    return True


@lru_cache(maxsize=4096)
def analyze(text: str) -> PromptFeatures:
    """Reads the features of one prompt (memoized: candidates recur across lookups)."""
    text = unicodedata.normalize("NFKC", text)
    items = _items(_tokenize(text))
    numbers, units, dates, quantities, used = _extract_quantities(items)

    words: set[str] = set()
    raw_words: set[str] = set()
    negations: list[str] = []
    antonym_sides: dict[int, set[int]] = {}
    antonym_words: dict[tuple[int, int], str] = {}
    entities: set[str] = set()
    entity_runs: list[tuple[str, ...]] = []
    run: list[str] = []
    all_words: list[str] = []
    order_seq: list[str] = []
    full_seq: list[str] = []

    previous_word = ""
    for index, item in enumerate(items):
        if item.kind == "num" or item.kind in ("date", "time"):
            canonical = item.lower if item.kind != "num" else _parse_number(item.text)
            order_seq.append(canonical)
            full_seq.append(canonical)
            if run:
                entity_runs.append(tuple(run))
                run = []
            previous_word = ""
            continue
        if item.kind == "poss":
            order_seq.append("'s")
            full_seq.append("'s")
            continue
        if item.kind in ("stop", "sym"):
            if item.kind == "sym" and item.text in ("&", ","):
                full_seq.append(item.text)
            elif item.kind == "sym":
                unit = _UNITS.get(item.text)
                if unit:
                    order_seq.append(unit)
                    full_seq.append(unit)
            if run:
                entity_runs.append(tuple(run))
                run = []
            previous_word = ""
            continue
        lower = item.lower
        all_words.append(lower)
        raw_words.add(lower)
        # "APIs" -> "api": an acronym's plural.
        if item.text.isupper() and len(item.text) > 1:
            folded = lower  # "HTTPS" is not the plural of "HTTP"
        elif len(item.text) > 2 and item.text[:-1].isupper() and item.text[-1] == "s":
            folded = lower[:-1]
        else:
            folded = _singular(lower)
        words.add(folded)
        if lower in _NEGATION_CUES:
            negations.append(lower)
        elif previous_word in _NEGATING_VERBS and lower == "to":
            negations.append(previous_word + " to")
        if item.privative:
            negations.append("-" + lower)
        # antonyms: single words and particle verbs ("zoom in", "log out")
        for form in (lower, f"{previous_word}_{lower}" if previous_word else ""):
            for group, side in _ANTONYM_INDEX.get(form, ()):
                antonym_sides.setdefault(group, set()).add(side)
                antonym_words.setdefault((group, side), form.replace("_", " "))
        previous_word = lower

        quantity = index in used
        if quantity:
            canonical = _UNITS.get(lower) or _ATTACHED_UNITS.get(lower) or lower
            order_seq.append(canonical)
            full_seq.append(canonical)
            if run:
                entity_runs.append(tuple(run))
                run = []
            continue
        if _is_entity(item) and lower not in _SMALL_NUMBERS and lower not in _ORDINALS:
            entities.add(folded)
            run.append(lower)
        elif run and lower in _ACRONYM_SKIP:
            run.append(lower)
        else:
            if run:
                entity_runs.append(tuple(run))
            run = []
        full_seq.append(folded)
        if lower not in _ORDER_STOPWORDS:
            order_seq.append(folded)
    if run:
        entity_runs.append(tuple(run))

    return PromptFeatures(
        numbers=numbers,
        units=frozenset(units),
        quantities=quantities,
        dates=dates,
        negations=tuple(negations),
        words=frozenset(words),
        raw_words=frozenset(raw_words),
        antonym_sides=antonym_sides,
        antonym_words=antonym_words,
        entities=frozenset(entities),
        entity_runs=tuple(entity_runs),
        all_words_seq=tuple(all_words),
        order_seq=tuple(order_seq),
        full_seq=tuple(full_seq),
    )


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"


def _counter_text(counter: Counter[str]) -> str:
    return ",".join(sorted(counter.elements())) or "none"


def _check_quantities(a: PromptFeatures, b: PromptFeatures) -> Verdict | None:
    if a.numbers != b.numbers:
        return Verdict(
            False, Reason.NUMBER, _short(f"numbers {_counter_text(a.numbers)} vs {_counter_text(b.numbers)}")
        )
    if a.dates != b.dates:
        return Verdict(
            False, Reason.NUMBER, _short(f"dates {_counter_text(a.dates)} vs {_counter_text(b.dates)}")
        )
    if a.units != b.units:
        only_a = ",".join(sorted(a.units - b.units)) or "none"
        only_b = ",".join(sorted(b.units - a.units)) or "none"
        return Verdict(False, Reason.NUMBER, _short(f"units {only_a} vs {only_b}"))
    if a.quantities != b.quantities and a.quantities and b.quantities:
        # Same numbers and units, paired differently: "100 USD in EUR" / "convert 100 EUR to USD".
        detail = f"{_counter_text(a.quantities)} vs {_counter_text(b.quantities)}"
        return Verdict(False, Reason.ORDER, _short(detail))
    return None


def _prefix_flips(a: PromptFeatures, b: PromptFeatures) -> list[str]:
    """Words of one prompt negated by a prefix or suffix in the other ("legal" / "illegal")."""
    flips: list[str] = []
    for mine, theirs in ((a.raw_words, b.raw_words), (b.raw_words, a.raw_words)):
        for word in mine - theirs:
            if len(word) < 3:
                continue
            for prefix in _NEGATING_PREFIXES:
                negated = prefix + word
                if (
                    negated in theirs
                    and negated not in mine
                    and negated not in _FALSE_PREFIX_PAIRS
                    and negated not in _NEGATION_CUES  # "unable" already counts as a cue
                ):
                    if len(word) >= _MIN_PREFIX_STEM.get(prefix, 3):
                        flips.append(f"{word}/{negated}")
            if word.endswith("ful") and word[:-3] + "less" in theirs and word[:-3] + "less" not in mine:
                flips.append(f"{word}/{word[:-3]}less")
    return sorted(set(flips))


def _antonym_flips(a: PromptFeatures, b: PromptFeatures) -> list[str]:
    """Opposite words: one prompt has only one side of a pair, the other only the other side."""
    flips: list[str] = []
    for group, sides_a in a.antonym_sides.items():
        sides_b = b.antonym_sides.get(group)
        if not sides_b or len(sides_a) != 1 or len(sides_b) != 1 or sides_a == sides_b:
            continue
        (side_a,) = sides_a
        (side_b,) = sides_b
        flips.append(f"{a.antonym_words[(group, side_a)]}/{b.antonym_words[(group, side_b)]}")
    return sorted(set(flips))


def _check_polarity(a: PromptFeatures, b: PromptFeatures) -> Verdict | None:
    explicit = abs(len(a.negations) - len(b.negations))
    prefix = _prefix_flips(a, b)
    antonyms = _antonym_flips(a, b)
    # A prefix negation and an opposite often name the same change ("unlock" is both): count it once.
    flips = len(prefix) + len(antonyms)
    if prefix and antonyms:
        flips = max(len(prefix), len(antonyms))
    if explicit == flips:
        # Balanced: "not allowed" / "forbidden", "forgot" / "can't remember", or nothing at all.
        return None
    if antonyms and not prefix and explicit == 0:
        return Verdict(False, Reason.ANTONYM, _short(", ".join(antonyms)))
    cues_a = ",".join(a.negations) or "none"
    cues_b = ",".join(b.negations) or "none"
    parts = [f"negation {cues_a} vs {cues_b}"] if explicit else []
    parts += prefix + antonyms
    return Verdict(False, Reason.NEGATION if explicit or prefix else Reason.ANTONYM, _short("; ".join(parts)))


def _acronym_of(run: Sequence[str]) -> str:
    return "".join(word[0] for word in run if word not in _ACRONYM_SKIP)


def _covered_by_acronym(entity: str, other: PromptFeatures) -> bool:
    """ "us" is covered by "United States", "nda" by "non-disclosure agreement", and the reverse."""
    letters = len(entity)
    if 2 <= letters <= 6:
        words = other.all_words_seq
        for start in range(len(words)):
            initials = ""
            for word in words[start:]:
                if word in _ACRONYM_SKIP:
                    continue
                initials += word[0]
                if len(initials) >= letters:
                    break
            if initials == entity:
                return True
    return False


def _check_entities(a: PromptFeatures, b: PromptFeatures) -> Verdict | None:
    only_a = {e for e in a.entities - b.entities if e not in b.words and not _covered_by_acronym(e, b)}
    only_b = {e for e in b.entities - a.entities if e not in a.words and not _covered_by_acronym(e, a)}
    # A word of an expanded acronym ("united", "states" for "US") is not a substitution either.
    for acronym_side, other_side, other_set in ((a, b, only_b), (b, a, only_a)):
        for run in other_side.entity_runs:
            if _acronym_of(run) in acronym_side.entities:
                other_set.difference_update(_singular(word) for word in run)
    if only_a and only_b:
        return Verdict(
            False, Reason.ENTITY, _short(f"{','.join(sorted(only_a))} vs {','.join(sorted(only_b))}")
        )
    return None


def _mismatch(x: Sequence[str], y: Sequence[str]) -> int:
    matched = sum(block.size for block in SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks())
    return len(x) + len(y) - 2 * matched


def _between(seq: Sequence[str], first: str, second: str) -> list[str]:
    i, j = seq.index(first), seq.index(second)
    lo, hi = min(i, j), max(i, j)
    return [t for t in seq[lo + 1 : hi] if t not in ("the", "a", "an")]


def _adjacent(seq: Sequence[str], first: str, second: str) -> bool:
    """Next to each other (a possessive between them counts as nothing): "economic inflation"."""
    if seq.count(first) != 1 or seq.count(second) != 1:
        return False
    i, j = seq.index(first), seq.index(second)
    lo, hi = min(i, j), max(i, j)
    return all(t == "'s" for t in seq[lo + 1 : hi])


def _symmetric(seq: Sequence[str], first: str, second: str) -> bool:
    if seq.count(first) != 1 or seq.count(second) != 1:
        return False
    gap = _between(seq, first, second)
    return bool(gap) and all(t in _SYMMETRIC_CONNECTORS for t in gap)


_SAME_RELATION = {"into": "to", "onto": "to", "towards": "to", "toward": "to", "unto": "to", "vs": "versus"}


def _context(seq: Sequence[str], word: str) -> str:
    """What precedes `word` (once in seq), articles skipped; "" for nothing that marks a role.

    A word with no role of its own right before "to" is the source of a direction, as if "from"
    preceded it: "the Edinburgh to London train" reads as "from Edinburgh to London".
    """
    position = seq.index(word)
    i = position - 1
    while i >= 0 and seq[i] in _CONTEXT_SKIP:
        i -= 1
    context = "" if i < 0 or seq[i] in _NO_ROLE else _SAME_RELATION.get(seq[i], seq[i])
    if (
        not context
        and position + 1 < len(seq)
        and _SAME_RELATION.get(seq[position + 1], seq[position + 1]) == "to"
    ):
        return "from"
    return context


def _exchanged_roles(a: PromptFeatures, b: PromptFeatures) -> Verdict | None:
    """Two words that trade what precedes them: "from Tokyo to Sydney" / "from Sydney to Tokyo",
    "can a landlord evict a tenant" / "can a tenant evict the landlord", "Rust than Go" / "Go than Rust"."""
    x, y = a.full_seq, b.full_seq
    if len(x) > _MAX_ORDER_TOKENS or len(y) > _MAX_ORDER_TOKENS:
        return None
    count_x, count_y = Counter(x), Counter(y)
    shared = [t for t in x if count_x[t] == 1 and count_y.get(t) == 1 and t not in _ORDER_STOPWORDS
              and t not in _NO_ROLE and t not in _CONTEXT_SKIP and t not in _SYMMETRIC_CONNECTORS
              and t not in ("'s", "of", "to", "from", "than", "into", "by", "for", "in", "on", "at", "with")]  # fmt: skip
    for i, first in enumerate(shared):
        for second in shared[i + 1 :]:
            if (x.index(first) < x.index(second)) == (y.index(first) < y.index(second)):
                continue
            a_first, a_second = _context(x, first), _context(x, second)
            if a_first == a_second:
                continue
            if _context(y, first) == a_second and _context(y, second) == a_first:
                if _symmetric(x, first, second) or _symmetric(y, first, second):
                    continue
                return Verdict(False, Reason.ORDER, _short(
                    f"{a_first or '·'} {first} … {a_second or '·'} {second} vs "
                    f"{a_first or '·'} {second} … {a_second or '·'} {first}"))  # fmt: skip
    return None


def _check_order(a: PromptFeatures, b: PromptFeatures) -> Verdict | None:
    exchanged = _exchanged_roles(a, b)
    if exchanged is not None:
        return exchanged
    x, y = a.order_seq, b.order_seq
    if not x or not y or len(x) > _MAX_ORDER_TOKENS or len(y) > _MAX_ORDER_TOKENS:
        return None
    count_x, count_y = Counter(x), Counter(y)
    shared = [t for t in x if count_x[t] == 1 and count_y.get(t) == 1 and t not in ("'s", "of")]
    if len(shared) < 2:
        return None
    position_y = {t: y.index(t) for t in shared}
    before = _mismatch(x, y)
    for i, first in enumerate(shared):
        for second in shared[i + 1 :]:
            if position_y[first] < position_y[second]:
                continue  # same relative order in both
            swapped = [second if t == first else first if t == second else t for t in x]
            after = _mismatch(swapped, y)
            if after <= 1 and before - after >= 2:
                if _symmetric(a.full_seq, first, second) or _symmetric(b.full_seq, first, second):
                    continue  # "X and Y" / "Y and X"
                if _adjacent(a.full_seq, first, second) or _adjacent(b.full_seq, first, second):
                    continue  # a modifier moved: "inflation in economics" / "economic inflation"
                return Verdict(False, Reason.ORDER, _short(f"{first} … {second} vs {second} … {first}"))
    return None


def verify(prompt: str, candidate: str) -> Verdict:
    """Accepts `candidate`'s stored answer for `prompt` unless the two ask different things."""
    if prompt == candidate:
        return ACCEPTED
    a, b = analyze(prompt), analyze(candidate)
    for check in (_check_quantities, _check_polarity, _check_entities, _check_order):
        verdict = check(a, b)
        if verdict is not None:
            return verdict
    return ACCEPTED


def lexicon_sizes() -> dict[str, int]:
    """Sizes of the built-in lexicons, for documentation and tests."""
    return {
        "antonym_groups": len(_ANTONYMS),
        "antonym_forms": len(_ANTONYM_INDEX),
        "units": len(set(_UNITS) | set(_ATTACHED_UNITS)),
        "negation_cues": len(_NEGATION_CUES),
        "common_words": len(_COMMON_WORDS),
    }
