"""builtin:constraints: prompts, the prompt parser, the strict verifier and the shaped reward."""

from __future__ import annotations

import itertools
import re

import pytest

from align.rewards import load_reward
from align.rewards.constraints import (
    DEFAULT_KINDS, END_PHRASES, KEYWORDS, KINDS, PHRASING_REGEXES, REQUESTS, SPLITS, START_WORDS, TOPICS,
    Constraint, constraint_prompts, constraint_reward, parse_constraint, shaped_constraint_reward, success_by_kind,
)


def C(kind, **params):
    return Constraint(kind, tuple(sorted(params.items())))


# (constraint, completion, finished, passes) — hand-made, including the edge cases of docs/constraints.md
CASES = [
    (C("lowercase"), "hello world, in 2024 there were 3 cats.", True, True),
    (C("lowercase"), "  élan, ça va? ünïcode  \n", True, True),
    (C("lowercase"), "Hello world", True, False),
    (C("lowercase"), "hello World", True, False),
    (C("lowercase"), "hello ǅ", True, False),  # a titlecase letter is not lowercase
    (C("lowercase"), "1234 5678", True, False),  # no letter at all
    (C("lowercase"), "", True, False),
    (C("lowercase"), "   \n ", True, False),
    (C("capitals"), "HELLO WORLD 42, ÇA VA!", True, True),
    (C("capitals"), "HELLO World", True, False),
    (C("capitals"), "", True, False),
    (C("max_words", n=3), "One two three.", True, True),
    (C("max_words", n=3), "One two three.", False, False),  # cut at the token limit: not over yet
    (C("max_words", n=3), "One two three four.", True, False),
    (C("max_words", n=3), "Don't stop", True, True),  # "don", "t", "stop": 3 words
    (C("max_words", n=2), "Don't stop", True, False),
    (C("max_words", n=3), "...", True, False),  # no word: never a pass
    (C("min_words", n=3), "one two three", True, True),
    (C("min_words", n=3), "one two three", False, True),  # a cut response has at least these words
    (C("min_words", n=3), "one two", True, False),
    (C("keyword", keyword="ocean"), "The OCEAN is deep.", True, True),
    (C("keyword", keyword="ocean"), "Oceans are deep.", True, False),
    (C("keyword", keyword="ocean"), "", True, False),
    (C("end_phrase", phrase="Hope this helps."), "Facts. Hope this helps.  \n", True, True),
    (C("end_phrase", phrase="Hope this helps."), "Facts. Hope this helps.", False, False),
    (C("end_phrase", phrase="Hope this helps."), "Facts. hope this helps.", True, False),
    (C("end_phrase", phrase="Hope this helps."), "Hope this helps. Bye!", True, False),
    (C("end_phrase", phrase="Hope this helps."), '"Facts. Hope this helps."', True, False),
    (C("start_word", word="Certainly"), "Certainly! Here it is.", True, True),
    (C("start_word", word="Certainly"), "**Certainly**, here it is.", True, True),
    (C("start_word", word="Certainly"), "\n certainly.", True, True),
    (C("start_word", word="Certainly"), "- Certainly", True, False),
    (C("start_word", word="Certainly"), "Sure. Certainly", True, False),
    (C("start_word", word="Certainly"), "Certainlyyy so", True, False),
    (C("no_commas", ), "No commas here. None at all!", True, True),
    (C("no_commas"), "One, two", True, False),
    (C("no_commas"), "One，two", True, False),
    (C("no_commas"), "", True, False),
    (C("quotes"), '"Hello there."', True, True),
    (C("quotes"), ' \n"Hello there." \n', True, True),
    (C("quotes"), '"Hello there."', False, False),
    (C("quotes"), '"Hello there.', True, False),
    (C("quotes"), "“Hello there.”", True, False),  # curly quotes are not the ASCII double quote
    (C("quotes"), '"', True, False),
    (C("quotes"), '""', True, False),
    (C("bullets", n=2), "* one\n* two", True, True),
    (C("bullets", n=2), "Intro:\n- one\n- two\nDone.", True, True),
    (C("bullets", n=2), "* one\n  * nested two", True, True),  # nested bullets count
    (C("bullets", n=2), "* one\n* two", False, False),
    (C("bullets", n=2), "* one\n* two\n* three", True, False),
    (C("bullets", n=2), "**Bold** text\n* one", True, False),
    (C("bullets", n=2), "---\n* one\n* two\n---", True, True),  # a rule is not a bullet
    (C("bullets", n=2), "1. one\n2. two", True, False),
    (C("bullets", n=2), "*one\n*two", True, False),  # the marker needs a space after it
    (C("json"), '{"topic": "tea", "facts": [1, 2]}', True, True),
    (C("json"), '```json\n{"topic": "tea"}\n```', True, True),
    (C("json"), '```\n{"topic": "tea"}\n```\n', True, True),
    (C("json"), '{"topic": "tea"}', False, False),
    (C("json"), '["tea", "coffee"]', True, False),  # valid JSON but not an object
    (C("json"), '{"topic": "tea"', True, False),
    (C("json"), 'Here it is: {"topic": "tea"}', True, False),
    (C("json"), "{}", True, False),  # no word
    (C("title"), "<<Tea Time>>\nTea is a drink.", True, True),
    (C("title"), "Tea <<>> is <<\n>>", True, False),
    (C("title"), "<<Tea\nTime>>", True, False),
    (C("postscript"), "Tea is a drink.\n\nP.S. I like tea.", True, True),
    (C("postscript"), "Tea is a drink.\n**P.S.** I like tea.", True, True),
    (C("postscript"), "Tea is a drink. P.S. I like tea.", True, False),
    (C("postscript"), "Tea is a drink.\np.s. I like tea.", True, False),
]


@pytest.mark.parametrize("constraint, completion, finished, passes", CASES)
def test_verifier_hand_made_cases(constraint, completion, finished, passes):
    assert constraint.passes(completion, finished) is passes
    shaped = constraint.score(completion, finished)
    assert 0.0 <= shaped <= 1.0
    assert (shaped == 1.0) is passes  # shaped is 1 exactly when the strict verifier passes


def test_every_kind_has_cases_and_enough_phrasings():
    assert len(KINDS) >= 10 and set(DEFAULT_KINDS) <= set(KINDS)
    assert {c.kind for c, *_ in CASES} == set(KINDS)
    for kind in KINDS.values():
        for split in SPLITS:
            assert len(kind.phrasings[split]) >= 3, (kind.name, split)


def test_end_anchored_kinds_fail_when_cut():
    """With finished=False the end-anchored kinds never pass and get half their credit; others are unchanged."""
    passing = {c.kind: (c, text) for c, text, finished, ok in CASES if ok and finished}
    for name, (constraint, text) in passing.items():
        cut = constraint.score(text, finished=False)
        assert cut == (0.5 if KINDS[name].end_anchored else 1.0), name
    assert {k for k, kind in KINDS.items() if kind.end_anchored} == {"max_words", "end_phrase", "quotes", "bullets", "json"}


SHAPED_CHAINS = [  # each list goes from worse to better; the last one passes
    (C("lowercase"), ["HELLO WORLD", "Hello World And More", "Hello world and more", "hello world and more"]),
    (C("capitals"), ["hello world", "HEllo world", "HELLO world", "HELLO WORLD"]),
    (C("max_words", n=2), ["a b c d e f", "a b c d", "a b c", "a b"]),
    (C("min_words", n=4), ["a", "a b", "a b c", "a b c d"]),
    (C("keyword", keyword="tea"), ["coffee", "teapot", "a cup of tea"]),
    (C("end_phrase", phrase="Hope this helps."), ["Bye.", "Hope this helps. Bye now.", "Facts. Hope this",
                                                  "Facts. hope this helps", "Facts. Hope this helps."]),
    (C("start_word", word="Sure"), ["No way", "Well then, sure", "Well, sure", "Sure, well"]),
    (C("no_commas"), ["a, b, c, d", "a, b, c d", "a, b c d", "a b c d"]),
    (C("quotes"), ["hi", '"hi', '"hi"']),
    (C("bullets", n=3), ["text", "* a", "* a\n* b", "* a\n* b\n* c"]),
    (C("bullets", n=3), ["* a\n* b\n* c\n* d\n* e\n* f", "* a\n* b\n* c\n* d\n* e", "* a\n* b\n* c\n* d",
                         "* a\n* b\n* c"]),
    (C("json"), ["tea", '{"a": "tea"', '{"a": "tea"}']),
    (C("title"), ["Tea", "<<Tea", "<<Tea>>"]),
    (C("postscript"), ["Tea.", "Tea. p.s. more", "Tea.\nP.S. more"]),
]


@pytest.mark.parametrize("constraint, chain", SHAPED_CHAINS)
def test_shaped_is_monotone_on_simple_cases(constraint, chain):
    scores = [constraint.score(text) for text in chain]
    assert all(a < b for a, b in itertools.pairwise(scores)), scores
    assert scores[-1] == 1.0 and constraint.passes(chain[-1])


def test_shaped_equals_one_iff_strict_on_many_completions():
    texts = [text for _, text, _, _ in CASES] + [t for _, chain in SHAPED_CHAINS for t in chain]
    constraints = [c for c, *_ in CASES] + [c for c, _ in SHAPED_CHAINS]
    for constraint in set(constraints):
        for text in texts:
            for finished in (True, False):
                shaped = constraint.score(text, finished)
                assert 0.0 <= shaped <= 1.0
                assert (shaped == 1.0) == constraint.passes(text, finished)


def _render(template: str, split: str) -> tuple[str, dict]:
    kind_values = {"n": 7, "keyword": KEYWORDS[split][0], "phrase": END_PHRASES[split][0], "word": START_WORDS[split][0]}
    fields = set(re.findall(r"{(\w+)}", template))
    params = {k: v for k, v in kind_values.items() if k in fields}
    return template.format(**params), params


WRAPPERS = {
    "plain": lambda u: u,
    "chatml": lambda u: (f"<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n{u}"
                         "<|im_end|>\n<|im_start|>assistant\n"),
    # what align's trainer scores: the ChatML prompt decoded with skip_special_tokens=True
    "chatml_decoded": lambda u: f"system\nYou are a helpful AI assistant.\nuser\n{u}\nassistant\n",
    "llama3": lambda u: ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                         "December 2023<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                         f"{u}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama3_decoded": lambda u: f"system\n\nCutting Knowledge Date: December 2023user\n\n{u}assistant\n\n",
    "messages": lambda u: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": u}],
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("split", SPLITS)
def test_parser_recovers_every_phrasing_in_every_wrapper(split, wrapper):
    wrap = WRAPPERS[wrapper]
    for kind in KINDS.values():
        for i, template in enumerate(kind.phrasings[split]):
            constraint, params = _render(template, split)
            request = REQUESTS[split][i % len(REQUESTS[split])].format(topic=TOPICS[split][i])
            for user in (f"{request} {constraint}", f"{constraint}\n\n{request}"):
                parsed = parse_constraint(wrap(user))
                assert parsed == C(kind.name, **params), (user, parsed)


def test_parser_takes_the_last_user_turn_of_a_conversation():
    first, _ = _render(KINDS["lowercase"].phrasings["train"][0], "train")
    last, params = _render(KINDS["bullets"].phrasings["train"][0], "train")
    chat = (f"<|im_start|>user\nTell me about tea. {first}<|im_end|>\n<|im_start|>assistant\nsure<|im_end|>\n"
            f"<|im_start|>user\nNow about coffee. {last}<|im_end|>\n<|im_start|>assistant\n")
    assert parse_constraint(chat) == C("bullets", **params)


def test_each_phrasing_matches_only_its_own_regex():
    for kind in KINDS.values():
        for split in SPLITS:
            for template in kind.phrasings[split]:
                text, _ = _render(template, split)
                matches = [name for name, regex in PHRASING_REGEXES if regex.search(text)]
                assert matches == [kind.name], (text, matches)


def test_no_request_looks_like_a_constraint():
    for split in SPLITS:
        for request in REQUESTS[split]:
            for topic in TOPICS[split]:
                text = request.format(topic=topic)
                assert not any(regex.search(text) for _, regex in PHRASING_REGEXES), text
                with pytest.raises(ValueError, match="no known constraint"):
                    parse_constraint(text)


def test_unrecognised_or_ambiguous_prompts_raise():
    with pytest.raises(ValueError, match="no known constraint phrasing"):
        constraint_reward(["<|im_start|>user\nWrite a haiku in French.<|im_end|>\n"], ["Bonjour"])
    two = "Tell me about tea. Answer in at most 5 words. Do not use any commas in your answer."
    with pytest.raises(ValueError, match="several constraints"):
        parse_constraint(two)


def test_splits_are_disjoint():
    assert not set(TOPICS["train"]) & set(TOPICS["heldout"])
    assert not set(REQUESTS["train"]) & set(REQUESTS["heldout"])
    for pool in (KEYWORDS, END_PHRASES, START_WORDS):
        assert not set(pool["train"]) & set(pool["heldout"])
    for kind in KINDS.values():
        assert not set(kind.phrasings["train"]) & set(kind.phrasings["heldout"]), kind.name
    heldout = constraint_prompts("heldout", 300, seed=0)
    train = constraint_prompts("train", 300, seed=0)
    assert not {r["topic"] for r in train} & {r["topic"] for r in heldout}
    assert not {r["constraint"] for r in train} & {r["constraint"] for r in heldout}


def test_prompts_are_seeded_balanced_and_conversational():
    rows = constraint_prompts("train", 130, seed=3)
    assert rows == constraint_prompts("train", 130, seed=3)
    assert rows != constraint_prompts("train", 130, seed=4)
    counts = {k: sum(r["kind"] == k for r in rows) for k in DEFAULT_KINDS}
    assert max(counts.values()) - min(counts.values()) <= 1
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and row["constraint"] in row["prompt"][0]["content"]
        assert parse_constraint(row["prompt"]).kind == row["kind"]
    some = constraint_prompts("heldout", 8, seed=0, kinds=["json", "quotes"])
    assert {r["kind"] for r in some} == {"json", "quotes"}
    with pytest.raises(ValueError, match="unknown constraints split"):
        constraint_prompts("test", 4)
    with pytest.raises(ValueError, match="unknown constraint kinds"):
        constraint_prompts("train", 4, kinds=["haiku"])


def test_rewards_are_registered_and_take_finished():
    assert load_reward("builtin:constraints") is constraint_reward
    assert load_reward("builtin:constraints_shaped") is shaped_constraint_reward
    prompt = WRAPPERS["chatml"]('Tell me about tea. End your answer with the exact phrase "Hope this helps.".')
    done = "Tea is nice. Hope this helps."
    assert constraint_reward([prompt, prompt], [done, "Tea is nice."]) == [1.0, 0.0]
    assert constraint_reward([prompt], [done], finished=[False]) == [0.0]
    strict = constraint_reward([prompt] * 2, [done, done], finished=[True, False])
    shaped = shaped_constraint_reward([prompt] * 2, [done, done], finished=[True, False])
    assert strict == [1.0, 0.0] and shaped == [1.0, 0.5]
    with pytest.raises(ValueError, match="finished has 1 entries for 2"):
        constraint_reward([prompt] * 2, [done, done], finished=[True])


def test_success_by_kind():
    lower = "Tell me about tea. Respond only in lowercase letters."
    commas = "Tell me about tea. Do not use any commas in your answer."
    table = success_by_kind([lower, lower, commas], ["tea is nice", "Tea is nice", "Tea, nice"])
    assert table == {"lowercase": 0.5, "no_commas": 0.0, "all": 1 / 3}
