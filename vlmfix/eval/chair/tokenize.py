"""The `simple` normalizer's tokenizer: Penn Treebank conventions, dependency-free.

Part of the metric definition of `chair.normalizer=simple` (it decides `Len` and which tokens can match):

* the caption is split on whitespace, then punctuation becomes its own token: brackets, quotes, `, ; : ! ?`
  and a period after a word, also mid-text ("dog." -> "dog", "."); "..." stays one token;
* a period stays inside decimals ("3.5"), inside dotted words ("u.s.a") and on the short abbreviations
  mr., mrs., dr., st., e.g., i.e., etc.; commas and colons stay between digits ("1,000", "10:30");
* clitics are split: "dog's" -> "dog", "'s"; "don't" -> "do", "n't"; "cannot" -> "can", "not";
* internal hyphens are kept ("t-shirt").

It expects lower-cased text (CHAIR lower-cases captions first).
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset({"mr.", "mrs.", "dr.", "st.", "e.g.", "i.e.", "etc."})
CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_SPLIT_WORDS = {"cannot": ("can", "not")}
_OPENING = "\"'`([{<"
_CLOSING = "\"',;:!?)]}>"
# Inside a chunk: a comma or colon not between two digits, one of ; @ # $ % & ! ? and brackets, or "--".
_INNER = re.compile(r"--|[;@#$%&!?()\[\]{}<>\"]|(?<!\d)[,:]|[,:](?!\d)")


def tokenize(text: str) -> list[str]:
    """Split lower-cased text into Treebank-style tokens.

    >>> tokenize("a dog's bowl. don't, 3.5 e.g. hot-dogs...")
    ['a', 'dog', "'s", 'bowl', '.', 'do', "n't", ',', '3.5', 'e.g.', 'hot-dogs', '...']
    """
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_chunk_tokens(chunk))
    return tokens


def _chunk_tokens(chunk: str) -> list[str]:
    head: list[str] = []
    while chunk and chunk[0] in _OPENING and not _is_clitic(chunk):
        head.append(chunk[0])
        chunk = chunk[1:]
    tail: list[str] = []
    while chunk:
        if chunk.endswith("..."):
            tail.insert(0, "...")
            chunk = chunk[:-3]
        elif chunk.endswith("."):
            if chunk in ABBREVIATIONS or chunk == ".":
                break
            tail.insert(0, ".")
            chunk = chunk[:-1]
        elif chunk[-1] in _CLOSING and not _is_clitic(chunk):
            tail.insert(0, chunk[-1])
            chunk = chunk[:-1]
        else:
            break
    middle: list[str] = []
    if chunk:
        start = 0
        for match in _INNER.finditer(chunk):
            middle.extend(_word_tokens(chunk[start : match.start()]))
            middle.append(match.group())
            start = match.end()
        middle.extend(_word_tokens(chunk[start:]))
    return head + middle + tail


def _is_clitic(chunk: str) -> bool:
    return chunk in CLITICS


def _word_tokens(word: str) -> list[str]:
    if not word:
        return []
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    for clitic in CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return [word[: -len(clitic)], clitic]
    return [word]


# Tokenizers that rewrite a character spell it otherwise (NLTK writes a double quote as `` or '').
_SPELLED = {"``": ('"', "``"), "''": ('"', "''")}


def token_spans(text: str, tokens: list[str]) -> list[tuple[int, int] | None]:
    """Each token's character span `(start, end)` in `text`, found left to right (None: not found as written).

    The tokens are those a tokenizer made from `text.lower()`, so they are looked up in the lower-cased text;
    the spans index `text` itself (a character whose lower case is longer, as "İ", is mapped back).

    >>> token_spans("Two Dogs' bowls.", ["two", "dogs", "'", "bowls", "."])
    [(0, 3), (4, 8), (8, 9), (10, 15), (15, 16)]
    """
    lowered = ""
    origin: list[int] = []  # origin[k]: the index in `text` of character k of `lowered`
    for index, char in enumerate(text):
        low = char.lower()
        lowered += low
        origin.extend([index] * len(low))
    origin.append(len(text))
    spans: list[tuple[int, int] | None] = []
    position = 0
    for token in tokens:
        found = [(at, len(form)) for form in _SPELLED.get(token, (token,)) if (at := lowered.find(form, position)) >= 0]
        if not found:
            spans.append(None)
            continue
        at, size = min(found)
        spans.append((origin[at], origin[at + size - 1] + 1))
        position = at + size
    return spans
