"""The continuous batcher: requests joining and leaving a running batch write exactly what
they write alone (``Engine.generate``), token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from chatrl.batching import ContinuousBatcher
from chatrl.engine import Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.models import load_causal_lm

TEXTS = [
    "What is 3 plus 4?",
    "The cat",
    "What is 1 plus 1? 1 plus 1 is 2. The cat sat on the mat and then",
    "Tell me",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def engine(request, micro_model):
    """An engine that never stops early (lengths follow max_new_tokens); Llama decodes through
    llama_decode, GPT-2 through its own forward."""
    model, tokenizer = load_causal_lm(micro_model)
    if request.param == "gpt2":
        torch.manual_seed(0)
        config = GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tokenizer)
        )
        model = GPT2LMHeadModel(config)
    engine = Engine(model.eval(), tokenizer, static_weights=True)
    engine.stop_token_ids = []
    return engine


def prompts(engine) -> list[list[int]]:
    return [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def alone(engine, prompt, params):
    return engine.generate([prompt], params)


def run(batcher, arrivals: dict[int, list], max_steps: int = 500) -> dict:
    """Step ``batcher``, adding ``(prompt, params)`` pairs at the steps ``arrivals`` names;
    every request's completions, in arrival order, and the rows each step ran."""
    requests, rows = [], []
    for step in range(max_steps):
        for prompt, params in arrivals.get(step, []):
            requests.append(batcher.add(prompt, params))
        if batcher.idle and step > max(arrivals):
            return {"completions": [r.completions() for r in requests], "rows": rows}
        batcher.step()
        rows.append(len(batcher.rows))
    raise AssertionError("the batcher did not finish")


def test_greedy_requests_joining_and_leaving_write_what_they_write_alone(engine):
    a, b, c, d = prompts(engine)
    greedy = [SamplingParams(max_new_tokens=m, temperature=0) for m in (20, 6, 12, 9)]
    arrivals = {0: [(a, greedy[0])], 3: [(b, greedy[1]), (c, greedy[2])], 5: [(d, greedy[3])]}
    result = run(ContinuousBatcher(engine), arrivals)
    expected = [
        alone(engine, p, g)
        for p, g in [(a, greedy[0]), (b, greedy[1]), (c, greedy[2]), (d, greedy[3])]
    ]
    for got, want in zip(result["completions"], expected, strict=True):
        assert [x.token_ids for x in got] == [x.token_ids for x in want]
        assert [x.text for x in got] == [x.text for x in want]
        assert [x.finish_reason for x in got] == ["length"]
        assert torch.allclose(got[0].model_logprobs, want[0].model_logprobs, atol=1e-4)
    assert max(result["rows"]) == 4  # they ran together
    assert result["rows"][-1] == 0  # and left


def test_a_seeded_sample_is_the_same_alone_and_beside_others(engine):
    a, b, c, _ = prompts(engine)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11)
    others = [
        (b, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5)),
        (c, SamplingParams(max_new_tokens=14, temperature=0)),
        (a, SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=5)),
    ]
    beside = run(ContinuousBatcher(engine), {0: others[:2], 2: [(a, seeded)], 4: others[2:]})
    by_itself = run(ContinuousBatcher(engine), {0: [(a, seeded)]})
    want = alone(engine, a, seeded)[0]
    assert beside["completions"][2][0].token_ids == want.token_ids
    assert by_itself["completions"][0][0].token_ids == want.token_ids
    # Sample i of n is seeded seed + i.
    three = beside["completions"][3]
    for i, sample in enumerate(three):
        single = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5 + i)
        assert sample.token_ids == alone(engine, a, single)[0].token_ids
    assert len({tuple(s.token_ids) for s in three}) > 1


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(engine):
    a, _, c, _ = prompts(engine)
    greedy = SamplingParams(max_new_tokens=30, temperature=0)
    batcher = ContinuousBatcher(engine, prefill_chunk=4)
    first = batcher.add(a, greedy)
    while not batcher.rows:
        batcher.step()
    long = batcher.add(c, SamplingParams(max_new_tokens=5, temperature=0))
    chunks = -(-len(c) // 4)
    for _ in range(chunks - 1):
        written = len(first.samples[0].sequence.token_ids)
        batcher.step()
        assert len(first.samples[0].sequence.token_ids) == written + 1  # decoding goes on
    assert first.samples[0].sequence.token_ids and not long.samples[0].sequence.token_ids
    batcher.step()
    assert len(long.samples[0].sequence.token_ids) == 2  # prefilled, then a decode step
    while not batcher.idle:
        batcher.step()
    assert long.completions()[0].token_ids == alone(engine, c, long.params)[0].token_ids
    assert first.completions()[0].token_ids == alone(engine, a, greedy)[0].token_ids


def test_streamed_text_adds_up_to_the_completion(micro_engine):
    engine = micro_engine
    prompt = prompts(engine)[0]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3, stop=["e"])
    batcher = ContinuousBatcher(engine)
    request = batcher.add(prompt, params, stream=True)
    texts, completion = [], None
    while not batcher.idle:
        for output in batcher.step():
            texts.append(output.text)
            completion = output.completion or completion
    assert "".join(texts) == completion.text == alone(engine, prompt, params)[0].text
    assert completion.token_ids == request.completions()[0].token_ids


def test_a_cancelled_request_frees_its_row_at_the_next_step(engine):
    a, b, _, _ = prompts(engine)
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    batcher = ContinuousBatcher(engine)
    kept, dropped = batcher.add(a, greedy), batcher.add(b, greedy)
    waiting = batcher.add(b, greedy)
    waiting.cancelled = True
    batcher.step()
    batcher.step()
    assert len(batcher.rows) == 2 and not batcher.waiting
    dropped.cancelled = True
    outputs = batcher.step()
    assert len(batcher.rows) == 1 and {o.request for o in outputs} <= {kept}
    while not batcher.idle:
        batcher.step()
    assert kept.completions()[0].token_ids == alone(engine, a, greedy)[0].token_ids
    assert not waiting.samples[0].sequence.token_ids


def test_requests_wait_for_room_and_impossible_ones_are_refused(micro_engine):
    engine = micro_engine
    a, b, c, _ = prompts(engine)
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    batcher = ContinuousBatcher(engine, max_batch_size=2, max_batch_tokens=200)
    result = run(batcher, {0: [(a, greedy), (b, greedy), (c, greedy)]})
    assert max(result["rows"]) == 2
    assert [r[0].token_ids for r in result["completions"]] == [
        alone(engine, p, greedy)[0].token_ids for p in (a, b, c)
    ]
    with pytest.raises(UserError, match="exceed the batch size 2"):
        batcher.add(a, SamplingParams(n=3))
    with pytest.raises(UserError, match="the batch holds 200"):
        batcher.add(a, SamplingParams(max_new_tokens=100, n=2))
    with pytest.raises(UserError, match="prompt 0 is empty"):
        batcher.add([], greedy)
    assert batcher.idle


def test_the_cache_grows_under_running_rows_within_its_budget(micro_engine):
    engine = micro_engine
    a, _, c, _ = prompts(engine)
    short, long = (
        SamplingParams(max_new_tokens=40, temperature=0),
        SamplingParams(max_new_tokens=300, temperature=0),
    )
    batcher = ContinuousBatcher(engine, max_batch_size=8, max_batch_tokens=4000)
    first = batcher.add(a, short)
    batcher.step()
    small = batcher.cache_slots
    second = batcher.add(c, long)
    batcher.step()
    assert batcher.cache_slots > small and len(batcher.rows) == 2
    while not batcher.idle:
        batcher.step()
        assert batcher.cache_slots <= 4000
    for request in (first, second):
        want = alone(engine, request.prompt, request.params)[0]
        assert request.completions()[0].token_ids == want.token_ids
