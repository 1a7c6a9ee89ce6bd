"""A prompt as the cache compares it: a sequence of tokens with every harmless difference folded away.

Two prompts ask the same thing, as far as the cache will ever assume, when their canonical token
sequences (`canonical_tokens`) are equal. The folding is deliberately small; each step changes only
what cannot change the answer (docs/cache.md says why for each):

1. Surface: Unicode compatibility forms (NFKC: full-width letters, ligatures), case (casefold),
   spacing, and punctuation between words (. , ; : ! ? quotes, brackets, dashes). An all-capitals
   word such as "IT" or "US" keeps its case in a prompt that is not written in capitals, so it
   never equals the pronoun. Numbers, symbols (% $ + = / ...) and every letter and accent stay.
2. Code stays verbatim: a fenced block or an `inline` span is one token compared character for
   character (only trailing spaces on a line are ignored); a prompt that looks like code outside
   fences (calls, braces, operators, indented lines, paths) is compared whole, verbatim.
3. Politeness and greetings ("please", "thanks", "hi", "bitte", "por favor", "s'il vous plaît").
4. English contractions written with or without the apostrophe ("don't", "dont" = "do not").
5. English articles ("a", "an", "the").
6. A request framed for the assistant ("Can you explain X" = "Could you please explain X" =
   "Explain X"), only at the start and only before a verb of request; a how-to question framed
   with a person or as a way ("How do I X" = "How can I X" = "What's the best way to X" =
   "How to X"), only at the start.

Tokens are Unicode-aware (`\\w` in any script; ideographs one per token), so the comparison works
in every language; the language knowledge above (steps 3-6) only widens what is equal. The word
order is kept: "who did X sue" and "who sued X" differ. `surface_tokens` stops after steps 1-2.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Bumped whenever the folding changes: exact keys made with another version never match.
CANON_VERSION = "lmc-canon-1"

# --- code ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
# Signs of code (or a path, a formula) outside fences: then case and spacing may matter everywhere.
_CODE_SIGNS = re.compile(
    r"[{}<>=|\\^~]"  # braces, comparisons, assignments, pipes, escapes
    r"|[A-Za-z_]\w*\("  # a call: name(
    r"|\w\[|\w\.\w+\("  # indexing, a method call
    r"|^(?: {4}|\t)\S"  # an indented line
    r"|\b[A-Za-z]+_[A-Za-z0-9_]+\b"  # snake_case identifiers
    r"|(?:^|\s)[-]{1,2}[A-Za-z]"  # command-line flags
    r"|[A-Za-z]/[A-Za-z]|/[A-Za-z]+/"  # paths
    r"|[@#][A-Za-z_]|\$[A-Za-z_{(]|;\s*$",
    re.MULTILINE,
)

# --- prose --------------------------------------------------------------------------------------

# Ideographic scripts are written without spaces: each character is a token of its own.
_IDEOGRAPHS = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")
# A word or number: letters and digits in any script, joined by an apostrophe or hyphen inside a
# word, and by . , : / inside a number (3.14, 1,000, 12:30, 3/4).
_TOKEN = re.compile(r"\w+(?:(?:['\-]|(?<=\d)[.,:/](?=\d))\w+)*|[^\w\s]")
# Punctuation between words: dropped. Everything else that is not a word is a symbol and kept.
_PAUSES = set(".,;:!?¿¡…\"'()[]«»‹›„‚“”‘’—–-·")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "´": "'"})
# Where a sentence or clause ends: kept as a marker while folding, never in the result.
_PAUSE = "\x01"
_SENTENCE_PAUSES = set(".,;!?…")
_DASH_NUMBER = re.compile(r"(?<![\w.])[-−](?=\d)")


@dataclass(frozen=True)
class _Segment:
    text: str
    code: bool


def _segments(text: str) -> list[_Segment]:
    """Prose and code spans, in order (fenced blocks first, then `inline` spans inside prose)."""
    segments: list[_Segment] = []
    position = 0
    for fence in _FENCE.finditer(text):
        segments += _inline(text[position : fence.start()])
        segments.append(_Segment(fence.group(), True))
        position = fence.end()
    segments += _inline(text[position:])
    return segments


def _inline(text: str) -> list[_Segment]:
    segments: list[_Segment] = []
    position = 0
    for span in _INLINE_CODE.finditer(text):
        segments.append(_Segment(text[position : span.start()], False))
        segments.append(_Segment(span.group(), True))
        position = span.end()
    segments.append(_Segment(text[position:], False))
    return [s for s in segments if s.text]


def _verbatim(text: str) -> str:
    """Code as compared: line ends unified, trailing spaces of each line and outer blank lines gone."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def looks_like_code(prose: str) -> bool:
    return _CODE_SIGNS.search(prose) is not None


def _mostly_capitals(text: str) -> bool:
    cased = [c for c in text if c.isupper() or c.islower()]
    return bool(cased) and sum(c.isupper() for c in cased) > 0.6 * len(cased)


def _word_key(word: str, keep_capitals: bool, sentence_start: bool) -> str:
    if keep_capitals and len(word) > 1 and word.isupper():
        return word  # an acronym: "IT" is not "it"
    if keep_capitals and len(word) == 1 and word.isupper() and word != "I" and not sentence_start:
        return word  # a letter as a name: "hepatitis A" keeps its "A", which is no article
    key = word.casefold()
    if any(c.isalpha() for c in key):
        key = key.replace("-", "")  # "e-mail" = "email"
    return key


def _prose_tokens(text: str, keep_capitals: bool) -> list[str]:
    text = _IDEOGRAPHS.sub(r" \1 ", _DASH_NUMBER.sub(" −", text))
    tokens = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token == "−":
            tokens.append("−")  # a minus sign before a number is kept
        elif token in _PAUSES:
            if token in _SENTENCE_PAUSES and tokens and tokens[-1] != _PAUSE:
                tokens.append(_PAUSE)
        elif token[0].isalnum() or token[0] == "_":
            tokens.append(_word_key(token, keep_capitals, not tokens or tokens[-1] == _PAUSE))
        else:
            tokens.append(token)
    return tokens


@lru_cache(maxsize=4096)
def surface_tokens(text: str) -> tuple[str, ...]:
    """The prompt's tokens with only surface differences folded (steps 1-2 of the module's doc)."""
    return tuple(t for t in _marked_tokens(text) if t != _PAUSE)


@lru_cache(maxsize=4096)
def _marked_tokens(text: str) -> tuple[str, ...]:
    """Surface tokens with a marker where a sentence or clause ends."""
    text = unicodedata.normalize("NFKC", text)
    segments = _segments(text)
    prose = " ".join(s.text for s in segments if not s.code)
    if looks_like_code(prose):
        return ("\x00code\x00" + _verbatim(text),)
    keep_capitals = not _mostly_capitals(prose)
    tokens: list[str] = []
    for segment in segments:
        if segment.code:
            tokens += ["\x00code\x00" + _verbatim(segment.text), _PAUSE]
        else:
            tokens += _prose_tokens(segment.text.translate(_APOSTROPHES), keep_capitals)
    return tuple(tokens)


# --- meaning-preserving folds (language knowledge: it only ever makes more prompts equal) -------

# Politeness, greetings and thanks, in the languages the cache is measured on.
_POLITENESS: tuple[tuple[str, ...], ...] = tuple(
    tuple(phrase.split())
    for phrase in (
        "thank you very much", "thank you in advance", "thanks in advance", "thanks a lot", "many thanks",
        "thank you", "thanks", "thx", "please", "pls", "plz", "kindly", "hi there", "hello there", "hey there",
        "hi", "hello", "hey", "greetings", "quick question",
        "s'il vous plaît", "s'il te plaît", "merci beaucoup", "merci", "bonjour", "salut",
        "vielen dank", "danke schön", "danke", "bitte schön", "bitte", "hallo", "guten tag",
        "muchas gracias", "gracias", "por favor", "hola", "buenos días",
        "per favore", "grazie", "ciao",
    )
)  # fmt: skip
# Prepositions that may lead a phrase fronted before the question ("In Excel, how do I ...").
_FRONTING_PREPOSITIONS = {
    "in", "on", "at", "for", "with", "without", "from", "during", "after", "before", "using", "within", "as",
    "dans", "pour", "avec", "sans", "en", "mit", "für", "ohne", "bei", "con", "para", "sin", "durante",
}  # fmt: skip
_MAX_FRONTED = 6
_ARTICLES = {"a", "an", "the"}
# The first words of every phrase looked for (politeness, frames): a quick test before the phrases.
_FIRST_WORDS = {phrase[0] for phrase in _POLITENESS}
_REQUEST_VERBS_EN = (
    "tell", "explain", "describe", "give", "show", "list", "write", "summarize", "summarise", "translate",
    "suggest", "recommend", "provide", "define", "compare", "outline", "clarify", "draft", "rewrite",
    "help", "generate", "create", "calculate", "compute", "convert", "name", "share", "teach",
)
_ENGLISH_WORDS = {
    "the", "a", "an", "is", "are", "was", "were", "be", "what", "how", "why", "who", "which", "where", "when",
    "do", "does", "did", "of", "to", "and", "or", "not", "i", "you", "it", "me", "my", "your", "our", "their",
    "this", "that", "can", "could", "will", "would", "should", "have", "has", "with", "for", "on", "in", "at",
    "from", "by", "about", "than", "if", "there", *_REQUEST_VERBS_EN,
}  # fmt: skip
# Letters of other Latin-script languages: their prompts are compared without the English folds.
_FOREIGN_LETTERS = re.compile(r"[áéíóúñàèìòùâêîôûçäöüßãõœæ¿¡]")
_OTHER_LANGUAGE_WORDS = {
    "quien", "como", "cual", "cuando", "donde", "cuanto", "qui", "quoi", "comment", "pourquoi", "quel", "quelle",
    "combien", "wo", "warum", "welche", "welcher", "wann", "chi", "come", "quando", "dove", "quem", "onde", "em",
    "que", "qué", "de", "del", "la", "el", "los", "las", "es", "est", "le", "les", "des", "du", "un", "una", "une",
    "y", "o", "por", "para", "il", "elle", "ne", "pas", "se", "der", "die", "das", "ist", "und", "nicht", "ein",
    "eine", "wie", "was", "wer", "à", "où", "¿", "¡", "al", "con", "sur", "dans", "avec", "mit", "für", "di", "che",
    "è", "per", "non",
}  # fmt: skip
_CONTRACTED_NOT = {"can't": ("can", "not"), "cannot": ("can", "not"), "won't": ("will", "not"),
                   "shan't": ("shall", "not"), "ain't": ("is", "not")}  # fmt: skip
# "'d" is left alone: "where'd you go" is "where did", not "where would".
_SUFFIXES = {"'re": "are", "'ve": "have", "'ll": "will", "'m": "am"}
_IS_CONTRACTED = {"it", "that", "what", "where", "who", "how", "there", "here", "he", "she", "when", "why", "this"}
# Contractions written without the apostrophe that are not words of their own.
_BARE_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
    "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "couldnt": "couldn't", "shouldnt": "shouldn't",
    "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't", "hadnt": "hadn't", "whats": "what's",
    "thats": "that's", "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're",
}  # fmt: skip
# Verbs after which "can you", "could you", "would you", "will you", "i want you to" only frame a request.
_REQUEST_VERBS = set(_REQUEST_VERBS_EN)
_REQUEST_FRAMES: tuple[tuple[str, ...], ...] = (
    ("can", "you"), ("could", "you"), ("would", "you"), ("will", "you"),
    ("i", "want", "you", "to"), ("i", "need", "you", "to"), ("i", "would", "like", "you", "to"),
    ("i'd", "like", "you", "to"),
)  # fmt: skip
_HOW_TO_FRAMES: tuple[tuple[str, ...], ...] = (
    ("how", "do", "i"), ("how", "can", "i"), ("how", "do", "you"), ("how", "can", "you"),
    ("how", "does", "one"), ("how", "can", "one"), ("how", "do", "we"), ("how", "can", "we"),
    # Articles are gone by then: "what is the best way to" reads "what is best way to".
    ("what", "is", "way", "to"), ("what", "is", "best", "way", "to"), ("what", "is", "good", "way", "to"),
    ("what", "are", "steps", "to"), ("how", "to"),
)  # fmt: skip


def _expand_contraction(token: str) -> tuple[str, ...]:
    token = _BARE_CONTRACTIONS.get(token, token)
    if "'" not in token:
        return (token,)
    if token in _CONTRACTED_NOT:
        return _CONTRACTED_NOT[token]
    if token.endswith("n't") and len(token) > 3:
        return (token[:-3], "not")
    for suffix, word in _SUFFIXES.items():
        if token.endswith(suffix) and len(token) > len(suffix):
            return (token[: -len(suffix)], word)
    if token.endswith("'s") and token[:-2] in _IS_CONTRACTED:
        return (token[:-2], "is")
    if token == "let's":
        return ("let", "us")
    return (token,)


def _phrase_at(tokens: list[str], i: int, phrases: tuple[tuple[str, ...], ...]) -> int:
    """The length of the phrase that starts at tokens[i], 0 if none does."""
    if i >= len(tokens) or tokens[i] not in _FIRST_WORDS:
        return 0
    for phrase in phrases:
        if tuple(tokens[i : i + len(phrase)]) == phrase:
            return len(phrase)
    return 0


def _without_politeness(tokens: list[str]) -> list[str]:
    """Greetings and thanks at the start or after the last sentence; "please" before a request.

    Only there: in the middle of a sentence the same words are content ("how do I say thank you
    in German" is not "how do I say hello in German"), so they stay.
    """
    kept: list[str] = []
    i = 0
    while i < len(tokens):
        at_start = not kept or all(t == _PAUSE for t in kept)
        n = _phrase_at(tokens, i, _POLITENESS)
        if n:
            rest = [t for t in tokens[i + n :] if t != _PAUSE]
            after_sentence = bool(kept) and kept[-1] == _PAUSE
            trailing = after_sentence and (not rest or _only_politeness(rest))
            before_request = (at_start or after_sentence) and bool(rest) and rest[0] in _REQUEST_VERBS
            if at_start or trailing or before_request:
                i += n
                continue
        kept.append(tokens[i])
        i += 1
    return kept


def _only_politeness(tokens: list[str]) -> bool:
    i = 0
    while i < len(tokens):
        n = _phrase_at(tokens, i, _POLITENESS)
        if not n:
            return False
        i += n
    return True


def _without_frame(tokens: list[str]) -> list[str]:
    """The request without the frame that only addresses the assistant (at the start)."""
    for frame in _REQUEST_FRAMES:
        n = len(frame)
        if tuple(tokens[:n]) == frame:
            rest = tokens[n:]
            while rest and (skip := _phrase_at(rest, 0, _POLITENESS)):
                rest = rest[skip:]
            if rest and rest[0] in _REQUEST_VERBS:
                return rest
    for frame in _HOW_TO_FRAMES:
        n = len(frame)
        if tuple(tokens[:n]) == frame and len(tokens) > n:
            return ["how", "to", *tokens[n:]]
    return tokens


@lru_cache(maxsize=4096)
def canonical_tokens(text: str) -> tuple[str, ...]:
    """The prompt's tokens with every difference the cache treats as harmless folded away."""
    return _folded(_marked_tokens(text))


def fronted_phrase_moved(text: str) -> tuple[str, ...] | None:
    """The canonical tokens with a fronted phrase moved to the end, if the prompt starts with one.

    "In Python, how do I reverse a list?" asks what "How do I reverse a list in Python?" asks: a
    short phrase led by a preposition and closed by a comma may sit at either end of a question.
    """
    marked = list(_marked_tokens(text))
    while marked and marked[0] == _PAUSE:
        marked.pop(0)
    if not marked or marked[0] not in _FRONTING_PREPOSITIONS or _PAUSE not in marked[:_MAX_FRONTED + 1]:
        return None
    end = marked.index(_PAUSE)
    phrase, rest = marked[:end], marked[end + 1 :]
    if len(phrase) < 2 or not rest or any(t.startswith("\x00code\x00") for t in phrase):
        return None
    while rest and rest[-1] == _PAUSE:
        rest.pop()
    return _folded((*rest, *phrase))


def _folded(marked: tuple[str, ...]) -> tuple[str, ...]:
    if len(marked) == 1 and marked[0].startswith("\x00code\x00"):
        return marked
    words = _without_politeness(list(marked))
    expanded = [part for token in words for part in _expand_contraction(token)]
    if not _english(expanded):
        return tuple(w for w in words if w != _PAUSE)
    words = expanded
    words = [w for w in words if w not in _ARTICLES and w != _PAUSE]
    return tuple(_without_frame(words))


def _english(tokens: list[str]) -> bool:
    """Whether the English folds apply: English function words and none of another language.

    "a" is an article only in English ("¿A quién demandó Apple?" is not "¿Quién demandó Apple?"),
    so a prompt that shows signs of another language is compared without them.
    """
    words = set(tokens)
    if words & _OTHER_LANGUAGE_WORDS or any(_FOREIGN_LETTERS.search(w) for w in words):
        return False
    return bool(words & _ENGLISH_WORDS)


def canonical_text(text: str) -> str:
    """The canonical tokens as one string (what the exact key hashes)."""
    return "\x1f".join(canonical_tokens(text))
