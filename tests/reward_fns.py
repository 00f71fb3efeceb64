"""Reward functions for the tests, named as ``--reward-fn reward_fns:NAME`` (tests/ is on the
path in pytest, and the cwd of the CLI runs that use them)."""

import re


def says_is(prompts, responses):
    """+1 for a response that contains the word "is", 0 otherwise."""
    return [float(bool(re.search(r"\bis\b", r))) for r in responses]


def shortest(prompts, responses):
    """Minus the number of words: Best-of-n by it picks the shortest response."""
    return [-float(len(r.split())) for r in responses]


def with_meta(prompts, responses, meta, finished):
    """The prompt's meta id, only for responses that stopped: checks the keyword arguments."""
    return [float(m["id"]) if f else -1.0 for m, f in zip(meta, finished, strict=True)]


def raises(prompts, responses):
    raise KeyError("no such task")


def too_few(prompts, responses):
    return [0.0]


def not_numbers(prompts, responses):
    return ["good"] * len(responses)


NOT_CALLABLE = 3
