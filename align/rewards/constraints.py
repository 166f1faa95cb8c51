"""Instruction following with verifiable constraints: prompts, a strict verifier and a shaped reward.

In the spirit of IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"):
each prompt is a request about a topic plus one constraint whose satisfaction a program can check
(all lowercase, at most N words, end with a given phrase, valid JSON object, ...). Pure text functions.

- ``constraint_prompts(split, n, seed)`` builds conversational prompt rows; the ``train`` and ``heldout``
  splits use disjoint topics, request templates, constraint phrasings and parameter values.
- ``constraint_reward`` (``builtin:constraints``) is the strict verifier: 1.0 when the completion satisfies
  the constraint, else 0.0. ``shaped_constraint_reward`` (``builtin:constraints_shaped``) gives partial
  credit in [0, 1] and equals 1 exactly when the strict verifier passes.
- Both recover the constraint from the prompt text alone (``parse_constraint``): the constraint sentence is
  matched against regular expressions built from the phrasing templates. Both take an optional
  ``finished`` list: a completion cut at the token limit (``finished[i] = False``) cannot pass a constraint
  about how the response ends. docs/constraints.md states every check exactly.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Callable, Sequence

SPLITS = ("train", "heldout")
WORD = re.compile(r"\w+")  # a word: a maximal run of Unicode letters, digits or underscores (IFEval's count)
# A bullet: a line whose first non-blank characters are "* " or "- " followed by text; indented
# (nested) bullets count too, as in IFEval. "**bold**", "---" and "1." are not bullets.
BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
TITLE = re.compile(r"<<[^<>\n]*\w[^<>\n]*>>")
# A postscript: a line starting with "P.S." (after blanks or markdown emphasis).
POSTSCRIPT = re.compile(r"^[ \t*_]*P\.[ \t]?S\.", re.MULTILINE)
JSON_FENCES = ("```json", "```Json", "```JSON", "```")  # a fence around the whole answer is allowed, as in IFEval


# --- checks: score(stripped text, **params) in [0, 1], exactly 1 when the constraint holds ---------------
def _case_counts(text: str) -> tuple[int, int, int]:
    """(lowercase, uppercase, titlecase) cased characters of ``text``."""
    lower = sum(c.islower() for c in text)
    upper = sum(c.isupper() for c in text)
    title = sum(c.istitle() and not c.isupper() for c in text)  # e.g. "ǅ": cased, neither lower nor upper
    return lower, upper, title


def lowercase_score(text: str) -> float:
    """1 / (1 + number of uppercase or titlecase letters), 0 without a lowercase letter. (Not a fraction of
    letters: ordinary text is ~97% lowercase, which would leave almost no difference between samples.)"""
    lower, upper, title = _case_counts(text)
    return 1.0 / (1 + upper + title) if lower else 0.0


def capitals_score(text: str) -> float:
    """Fraction of cased characters that are uppercase (1: no lowercase or titlecase letter)."""
    lower, upper, title = _case_counts(text)
    return upper / (lower + upper + title) if upper else 0.0


def max_words_score(text: str, n: int) -> float:
    """1 for at most ``n`` words, else n / words."""
    words = len(WORD.findall(text))
    return 1.0 if words <= n else n / words


def min_words_score(text: str, n: int) -> float:
    """1 for at least ``n`` words, else words / n."""
    return min(1.0, len(WORD.findall(text)) / n)


def keyword_score(text: str, keyword: str) -> float:
    """1 if ``keyword`` occurs as a whole word (case-insensitive); 0.5 if only inside a longer word."""
    if re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.IGNORECASE):
        return 1.0
    return 0.5 if keyword.lower() in text.lower() else 0.0


def _bare_word(token: str) -> str:
    """A whitespace-separated token without its leading/trailing punctuation or markdown marks."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", token).lower()


def start_word_score(text: str, word: str) -> float:
    """1 / (1 + i) where token i is the first whitespace-separated token that is ``word`` once stripped of
    punctuation (case-insensitive); so 1 when the first token is the word, 0 when no token is."""
    for i, token in enumerate(text.split()):
        if _bare_word(token) == word.lower():
            return 1.0 / (1 + i)
    return 0.0


def end_phrase_score(text: str, phrase: str) -> float:
    """1 if the text ends with ``phrase`` exactly (case-sensitive); else 0.9 × the fraction of the phrase's
    words found among the text's last as many words (compared as bare words, ignoring case), and at least 0.5
    if the phrase occurs anywhere, ignoring case."""
    if text.endswith(phrase):
        return 1.0
    wanted = [_bare_word(w) for w in phrase.split()]
    last = {_bare_word(w) for w in text.split()[-len(wanted):]}
    overlap = sum(w in last for w in wanted) / len(wanted)
    return max(0.9 * overlap, 0.5 if phrase.lower() in text.lower() else 0.0)


def no_commas_score(text: str) -> float:
    """1 / (1 + number of commas), ASCII "," and fullwidth "，"."""
    return 1.0 / (1 + text.count(",") + text.count("，"))


def quotes_score(text: str) -> float:
    """0.5 for a first character '"' plus 0.5 for a last character '"' (two distinct characters)."""
    if len(text) < 2:
        return 0.0
    return 0.5 * (text[0] == '"') + 0.5 * (text[-1] == '"')


def bullets_score(text: str, n: int) -> float:
    """1 for exactly ``n`` bullets, else 0.9 × max(0, 1 − |bullets − n| / n)."""
    bullets = len(BULLET.findall(text))
    return 1.0 if bullets == n else 0.9 * max(0.0, 1 - abs(bullets - n) / n)


def json_body(text: str) -> str:
    """The text without a markdown code fence around it (```json ... ``` or ``` ... ```)."""
    for fence in JSON_FENCES:
        if text.startswith(fence):
            return text.removeprefix(fence).removesuffix("```").strip()
    return text


def json_score(text: str) -> float:
    """1 if the (unfenced) text parses with ``json.loads`` to an object; else 0.4 for starting with "{"
    plus 0.4 for ending with "}"."""
    body = json_body(text)
    try:
        if isinstance(json.loads(body), dict):
            return 1.0
    except ValueError:
        pass
    return 0.4 * body.startswith("{") + 0.4 * body.endswith("}")


def title_score(text: str) -> float:
    """1 if a title <<...>> (on one line, with a word inside) occurs; else 0.25 each for "<<" and ">>"."""
    if TITLE.search(text):
        return 1.0
    return 0.25 * ("<<" in text) + 0.25 * (">>" in text)


def postscript_score(text: str) -> float:
    """1 if a line starts with "P.S." (after blanks or * _ emphasis); else 0.5 if "p.s" occurs, any case."""
    if POSTSCRIPT.search(text):
        return 1.0
    return 0.5 if "p.s" in text.lower() else 0.0


# --- the kinds: checks, phrasings and parameter values per split -----------------------------------------
@dataclass(frozen=True)
class Kind:
    """One constraint kind. Phrasing templates name their parameters ``{n}`` (an integer) or, always between
    double quotes, ``"{keyword}"``, ``"{phrase}"``, ``"{word}"``."""

    name: str
    score: Callable[..., float]  # (stripped completion, **params) -> [0, 1], 1 exactly when satisfied
    end_anchored: bool  # about how the response ends: a completion cut at the token limit cannot pass
    phrasings: dict[str, tuple[str, ...]]  # split -> templates
    values: dict[str, dict[str, tuple]]  # split -> parameter -> the values it is drawn from


def _kind(name, score, end_anchored, train, heldout, values=None):
    values = values or {"train": {}, "heldout": {}}
    return Kind(name, score, end_anchored, {"train": tuple(train), "heldout": tuple(heldout)}, values)


KEYWORDS = {
    "train": ("important", "simple", "future", "people", "world", "history", "nature", "energy", "change",
              "example", "amazing", "daily", "science", "community"),
    "heldout": ("unique", "culture", "balance", "journey", "modern", "design"),
}
END_PHRASES = {
    "train": ("Is there anything else I can help with?", "Thanks for reading!", "Hope this helps.",
              "That is all for now.", "Let me know if you have other questions.", "Stay curious!"),
    "heldout": ("Any other questions?", "Have a great day!", "That sums it up.", "Enjoy learning more!"),
}
START_WORDS = {
    "train": ("Certainly", "Today", "Interestingly", "Yes", "Well", "Imagine", "Sure", "Indeed", "Actually",
              "Basically"),
    "heldout": ("Absolutely", "Honestly", "Notably", "Surprisingly", "First", "Hello"),
}

KINDS: dict[str, Kind] = {k.name: k for k in [
    _kind("lowercase", lowercase_score, False, [
        "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
        "Write your whole answer in lowercase letters only, without a single capital letter.",
        "Please reply using only lowercase letters.",
        "Do not use any capital letters anywhere in your reply; everything must be lowercase.",
    ], [
        "Make sure your entire answer is written in lowercase, with no uppercase letters at all.",
        "Respond only in lowercase letters.",
        "Use lowercase letters exclusively in your response.",
    ]),
    _kind("capitals", capitals_score, False, [
        "Your entire response should be in English and in all capital letters.",
        "Write your whole answer in uppercase letters only.",
        "Please reply using only CAPITAL LETTERS.",
        "Every letter of your response must be a capital letter.",
    ], [
        "Make sure your entire answer is written in capital letters, with no lowercase letters at all.",
        "Respond only in uppercase letters.",
        "Use capital letters exclusively in your response.",
    ]),
    _kind("max_words", max_words_score, True, [
        "Answer in at most {n} words.",
        "Your response should contain no more than {n} words.",
        "Please keep your reply short: {n} words or fewer.",
        "Use at most {n} words in your entire response.",
    ], [
        "Limit your answer to {n} words or less.",
        "Do not write more than {n} words.",
        "Your reply must not exceed {n} words.",
    ], {"train": {"n": (20, 25, 30, 40, 50)}, "heldout": {"n": (15, 35, 45)}}),
    _kind("min_words", min_words_score, False, [
        "Answer with at least {n} words.",
        "Your response should contain at least {n} words.",
        "Write no fewer than {n} words in your reply.",
        "Make your response {n} words or longer.",
    ], [
        "Use a minimum of {n} words in your answer.",
        "Your answer must be at least {n} words long.",
        "Write {n} words or more.",
    ], {"train": {"n": (20, 30, 40)}, "heldout": {"n": (25, 35)}}),
    _kind("keyword", keyword_score, False, [
        'Include the keyword "{keyword}" in your response.',
        'Make sure to use the word "{keyword}" somewhere in your answer.',
        'Your reply must mention the word "{keyword}".',
        'Be sure to include the word "{keyword}" at least once.',
    ], [
        'In your response, the word "{keyword}" should appear at least once.',
        'Please use the keyword "{keyword}" in your reply.',
        'Your answer has to contain the word "{keyword}".',
    ], {split: {"keyword": KEYWORDS[split]} for split in SPLITS}),
    _kind("end_phrase", end_phrase_score, True, [
        'Finish your response with this exact phrase "{phrase}". No other words should follow this phrase.',
        'End your answer with the exact phrase "{phrase}".',
        'Your reply must end with the words "{phrase}" and nothing after them.',
        'Conclude your response with the phrase "{phrase}", with nothing after it.',
    ], [
        'The very last words of your response must be "{phrase}".',
        'Close your answer with the exact phrase "{phrase}" and add nothing after it.',
        'Make sure your reply ends with "{phrase}".',
    ], {split: {"phrase": END_PHRASES[split]} for split in SPLITS}),
    _kind("start_word", start_word_score, False, [
        'Start your response with the word "{word}".',
        'The first word of your answer must be "{word}".',
        'Begin your reply with the word "{word}".',
        'Your response should open with the word "{word}".',
    ], [
        'Make "{word}" the very first word of your response.',
        'Your answer must start with the word "{word}".',
        'Open your reply with the word "{word}".',
    ], {split: {"word": START_WORDS[split]} for split in SPLITS}),
    _kind("no_commas", no_commas_score, False, [
        "In your entire response, refrain from the use of any commas.",
        "Do not use any commas in your answer.",
        "Write your reply without using a single comma.",
        "Avoid commas completely in your response.",
    ], [
        "Your response must not contain any commas.",
        "Please answer without any commas.",
        "Do not include a single comma anywhere in your reply.",
    ]),
    _kind("quotes", quotes_score, True, [
        "Wrap your entire response with double quotation marks.",
        "Put your whole answer inside double quotes.",
        "Enclose your entire reply in double quotation marks.",
        "Your response must begin and end with a double quote character.",
    ], [
        "Surround your entire answer with double quotation marks.",
        "Place your whole response between double quotes.",
        "Make sure your reply is wrapped in double quotes.",
    ]),
    _kind("bullets", bullets_score, True, [
        "Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as: * This is a point.",
        "Format your response as a list of exactly {n} bullet points.",
        "Give exactly {n} bullet points in markdown format.",
        "Write your reply as exactly {n} bullet points.",
    ], [
        "Structure your answer as exactly {n} bullet points.",
        "Include exactly {n} bullet points (markdown list items) in your reply.",
        "Present your response in exactly {n} markdown bullet points.",
    ], {"train": {"n": (2, 3, 4, 5)}, "heldout": {"n": (2, 3, 4, 5)}}),
    _kind("json", json_score, True, [
        "Your entire output should be a single JSON object.",
        "Format your whole response as a valid JSON object.",
        "Reply with a JSON object only.",
        "Return your answer as a JSON object.",
    ], [
        "Provide your entire response as a JSON object.",
        "The whole reply must be valid JSON: a single object.",
        "Write your answer in JSON, as a single object.",
    ]),
    _kind("title", title_score, False, [
        "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        "Give your response a title in double angular brackets, like <<my title>>.",
        "Include a title wrapped in double angle brackets, for example <<a short title>>.",
        "Add a title to your reply, enclosed in double angular brackets like <<title>>.",
    ], [
        "Put a title in double angular brackets, such as <<the title>>, in your response.",
        "Your reply should include a title surrounded by double angle brackets, e.g. <<my title>>.",
        "Include a title formatted as <<title>>.",
    ]),
    _kind("postscript", postscript_score, False, [
        "At the end of your response, please explicitly add a postscript starting with P.S.",
        "Add a postscript at the end of your reply, beginning with P.S.",
        "End with a postscript that starts with P.S.",
        "Please include a postscript starting with P.S. after your main answer.",
    ], [
        "Finish with a short postscript that begins with P.S.",
        "After your answer, add a note starting with P.S.",
        "Remember to add a P.S. at the end of your response.",
    ]),
]}

# The default training/evaluation mix: the kinds that SmolLM2-135M-Instruct satisfies at least sometimes at
# temperature 1, or gets partial credit for, so that an online run sees reward differences within a group
# (measured per kind in docs/constraints.md). capitals, quotes, bullets and start_word were never satisfied
# in that probe; they stay available through ``kinds=``.
DEFAULT_KINDS = ("lowercase", "max_words", "min_words", "keyword", "end_phrase", "no_commas", "json", "title",
                 "postscript")

TOPICS = {
    "train": (
        "the water cycle", "honey bees", "the history of chess", "volcanoes", "learning a new language",
        "the moon", "recycling", "coffee", "the ocean", "electric cars", "sleep", "the Roman Empire",
        "photosynthesis", "jazz music", "mountain hiking", "the internet", "rainforests", "breakfast",
        "the solar system", "gardening", "penguins", "baking bread", "the Olympic Games", "public libraries",
        "wind energy", "dinosaurs", "friendship", "time management", "the human heart", "trains",
        "chocolate", "deserts", "board games", "rivers", "vaccines", "the camera", "elephants",
        "saving money", "football", "bridges",
    ),
    "heldout": (
        "lighthouses", "octopuses", "the printing press", "tea", "glaciers", "bicycles", "the immune system",
        "origami", "earthquakes", "classical music", "city parks", "owls", "solar panels", "ancient Egypt",
        "snow", "museums", "kites", "coral reefs", "pottery", "the periodic table",
    ),
}
REQUESTS = {
    "train": (
        "Tell me about {topic}.", "Write a few lines about {topic}.", "Explain {topic} in simple terms.",
        "What should a beginner know about {topic}?", "Describe {topic} briefly.",
        "Give me a quick overview of {topic}.", "Share some interesting facts about {topic}.",
        "Why do people care about {topic}?", "Write a brief note on {topic}.",
        "Summarize the main ideas behind {topic}.",
    ),
    "heldout": (
        "Can you tell me something about {topic}?", "Write a few sentences on {topic}.",
        "What is worth knowing about {topic}?", "Give a short explanation of {topic}.",
        "I would like to learn about {topic}.", "Talk briefly about {topic}.",
    ),
}


# --- prompts ----------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown constraints split {split!r}; expected one of {SPLITS}")


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown constraint kinds {unknown}; known: {sorted(KINDS)}")


def constraint_prompts(split: str = "train", n: int = 256, seed: int = 0,
                       kinds: Sequence[str] | None = None) -> list[dict]:
    """``n`` prompt rows ``{"prompt": [{"role": "user", "content": text}], "kind", "constraint", "topic"}``.

    ``text`` is a request about a topic and one constraint sentence (after it, or before it for one prompt in
    five). The kinds (default ``DEFAULT_KINDS``) take turns in a shuffled order, so each appears n/len(kinds)
    times (±1). Deterministic in (split, n, seed, kinds).
    """
    _check_split(split)
    kinds = tuple(kinds or DEFAULT_KINDS)
    _check_kinds(kinds)
    rng = random.Random(f"constraints:{split}:{seed}")
    order = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(order)
    rows = []
    for name in order:
        kind = KINDS[name]
        topic = rng.choice(TOPICS[split])
        request = rng.choice(REQUESTS[split]).format(topic=topic)
        params = {p: rng.choice(choices) for p, choices in sorted(kind.values[split].items())}
        constraint = rng.choice(kind.phrasings[split]).format(**params)
        text = f"{constraint}\n\n{request}" if rng.random() < 0.2 else f"{request} {constraint}"
        rows.append({"prompt": [{"role": "user", "content": text}], "kind": name, "constraint": constraint,
                     "topic": topic})
    return rows


# --- parsing a prompt back into its constraint ------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    """A parsed constraint: its kind and parameters (``{"n": 3}``, ``{"phrase": "..."}``, ...)."""

    kind: str
    params: tuple[tuple[str, int | str], ...] = ()

    def score(self, completion: str, finished: bool = True) -> float:
        """The shaped score in [0, 1]; 1 exactly when ``passes``."""
        kind = KINDS[self.kind]
        text = completion.strip()
        if not WORD.search(text):  # an answer without a single word satisfies no instruction
            return 0.0
        value = kind.score(text, **dict(self.params))
        # a cut response has not ended: it cannot pass a constraint on its end, and gets half the credit
        return value if finished or not kind.end_anchored else 0.5 * value

    def passes(self, completion: str, finished: bool = True) -> bool:
        return self.score(completion, finished) == 1.0


_PARAM_PATTERNS = {"n": r"(?P<n>\d+)", "keyword": r'(?P<keyword>[^"\n]+)', "phrase": r'(?P<phrase>[^"\n]+)',
                   "word": r'(?P<word>[^"\n]+)'}


def phrasing_regex(template: str) -> re.Pattern:
    """The regex matching ``template`` rendered with any parameter values; any run of whitespace matches
    the template's single spaces (a chat template or a user may re-wrap the line)."""
    pieces = []
    for literal, field, _, _ in string.Formatter().parse(template):
        pieces.append(r"\s+".join(re.escape(chunk) for chunk in literal.split(" ")))
        if field is not None:
            pieces.append(_PARAM_PATTERNS[field])
    return re.compile("".join(pieces))


PHRASING_REGEXES: tuple[tuple[str, re.Pattern], ...] = tuple(
    (kind.name, phrasing_regex(template))
    for kind in KINDS.values() for split in SPLITS for template in kind.phrasings[split])

# (opening, closing) markers of a user turn in common chat templates: ChatML, Llama 3, Gemma, Llama 2/Mistral.
USER_TURN_MARKERS = (
    ("<|im_start|>user", "<|im_end|>"),
    ("<|start_header_id|>user<|end_header_id|>", "<|eot_id|>"),
    ("<start_of_turn>user", "<end_of_turn>"),
    ("[INST]", "[/INST]"),
)


def last_user_turn(prompt: str | list) -> str:
    """The text of the last user turn: of a message list, or of a rendered chat template whose special
    tokens were kept. Otherwise (plain text, or a template decoded without its special tokens) the whole
    text, which then holds a single constraint sentence too."""
    if isinstance(prompt, list):  # conversational: [{"role": ..., "content": ...}, ...]
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    for opening, closing in USER_TURN_MARKERS:
        start = prompt.rfind(opening)
        if start >= 0:
            turn = prompt[start + len(opening):]
            end = turn.find(closing)
            return turn if end < 0 else turn[:end]
    return prompt


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


@lru_cache(maxsize=4096)
def _parse(turn: str) -> Constraint:
    found = {}
    for name, regex in PHRASING_REGEXES:
        for match in regex.finditer(turn):
            params = tuple((k, int(v) if k == "n" else v) for k, v in sorted(match.groupdict().items()))
            found[(match.start(), match.end())] = Constraint(name, params)
    if not found:
        raise ValueError(f"no known constraint phrasing in the prompt {_short(turn)!r} (builtin:constraints "
                         "rewards score prompts made by align.rewards.constraints.constraint_prompts)")
    if len(set(found.values())) > 1:
        raise ValueError(f"several constraints in the prompt {_short(turn)!r}: {sorted(set(found.values()), key=str)}")
    return next(iter(found.values()))


def parse_constraint(prompt: str | list) -> Constraint:
    """The constraint of ``prompt`` (the text the policy saw, or a message list). Raises ``ValueError`` when
    its last user turn holds no known constraint phrasing, or several different ones."""
    return _parse(last_user_turn(prompt))


# --- rewards ----------------------------------------------------------------------------------------------
def _scores(prompts: Sequence, completions: Sequence[str], finished: Sequence[bool] | None) -> list[float]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if finished is None:
        finished = [True] * len(completions)
    elif len(finished) != len(completions):
        raise ValueError(f"finished has {len(finished)} entries for {len(completions)} completions")
    return [parse_constraint(p).score(c, bool(f)) for p, c, f in zip(prompts, completions, finished)]


def constraint_reward(prompts: list[str], completions: list[str], finished: list[bool] | None = None) -> list[float]:
    """Strict verifier (``builtin:constraints``): 1.0 when a completion satisfies its prompt's constraint,
    else 0.0. ``finished[i]`` False marks completion i as cut at the token limit (it then fails the
    end-anchored kinds: max_words, end_phrase, quotes, bullets, json); None means every completion ended."""
    return [float(s == 1.0) for s in _scores(prompts, completions, finished)]


def shaped_constraint_reward(prompts: list[str], completions: list[str],
                             finished: list[bool] | None = None) -> list[float]:
    """Shaped training reward (``builtin:constraints_shaped``): partial credit in [0, 1], exactly 1 when
    ``constraint_reward`` is 1. Same arguments as ``constraint_reward``."""
    return _scores(prompts, completions, finished)


def success_by_kind(prompts: list[str], completions: list[str], finished: list[bool] | None = None,
                    shaped: bool = False) -> dict[str, float]:
    """Mean strict (or shaped) reward per constraint kind, plus ``"all"`` over every completion."""
    values = (shaped_constraint_reward if shaped else constraint_reward)(prompts, completions, finished)
    by_kind: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, values):
        by_kind.setdefault(parse_constraint(prompt).kind, []).append(value)
    table = {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())}
    table["all"] = sum(values) / len(values) if values else 0.0
    return table
