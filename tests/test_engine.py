"""The generation engine against Hugging Face ``generate()`` and full forward passes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from chatrl import engine as engine_module
from chatrl.chat_format import END_OF_TURN
from chatrl.engine import Engine, SamplingParams, Sequence
from chatrl.errors import UserError
from chatrl.models import load_causal_lm

PROMPTS = ["What is 3 plus 4?", "The cat", "What is 1 plus 1? 1 plus 1 is 2. The cat sat on"]


@pytest.fixture(scope="module")
def llama(micro_model):
    model, tokenizer = load_causal_lm(micro_model)
    return model.eval(), tokenizer


def small_model(kind: str, vocab_size: int):
    """A tiny randomly initialised model of another architecture (GQA where it has one)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=vocab_size)
        return GPT2LMHeadModel(config).eval()
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
    )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    if kind == "gemma":
        # (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GELU MLP, tied head.
        return GemmaForCausalLM(GemmaConfig(**shape, head_dim=8)).eval()
    if kind == "phi":
        # LayerNorm, attention and MLP in parallel off one norm, partial rotary, untied head.
        return PhiForCausalLM(PhiConfig(**shape, partial_rotary_factor=0.5)).eval()
    return MistralForCausalLM(MistralConfig(**shape, sliding_window=64)).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2", "mistral", "gemma", "phi"])
def any_model(request, llama):
    _, tokenizer = llama
    if request.param == "llama":
        return llama
    return small_model(request.param, len(tokenizer)), tokenizer


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_greedy(model, prompts: list[list[int]], pad: int, new_tokens: int) -> list[list[int]]:
    """``model.generate()``'s greedy continuation of left-padded prompts, never stopping early."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,  # no early stop (min_new_tokens would suppress EOS and change argmax)
        pad_token_id=pad,
    )
    return out[:, width:].tolist()


def forward_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Log-softmax logits (fp32) predicting each response token, from one full forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1)


def no_stops(model, tokenizer, **kwargs) -> Engine:
    engine = Engine(model, tokenizer, **kwargs)
    engine.stop_token_ids = []
    return engine


def test_greedy_matches_generate_batched_and_alone(any_model):
    model, tokenizer = any_model
    prompts = encode(tokenizer, PROMPTS)
    engine = no_stops(model, tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    expected = hf_greedy(model, prompts, tokenizer.pad_token_id, 12)
    batched = engine.generate(prompts, params)
    assert [c.token_ids for c in batched] == expected
    assert all(c.finish_reason == "length" for c in batched)
    for prompt, want in zip(prompts, expected, strict=True):
        assert engine.generate([prompt], params)[0].token_ids == want
    # Greedy text is the decoded ids, greedy log-probs are certain.
    assert batched[0].text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert torch.equal(batched[0].logprobs, torch.zeros(12))


def test_logprobs_match_a_full_forward(any_model):
    model, tokenizer = any_model
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9, n=2, seed=1)
    completions = no_stops(model, tokenizer).generate(prompts, params)
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2]
    warpers = [TopKLogitsWarper(50), TopPLogitsWarper(0.9)]
    for c in completions:
        model_logp = forward_logprobs(model, prompts[c.prompt_index], c.token_ids)
        scores = model_logp / 0.7
        for warp in warpers:
            scores = warp(None, scores)
        sampling_logp = scores.log_softmax(-1)
        index = torch.tensor(c.token_ids)[:, None]
        assert c.model_logprobs.dtype == c.logprobs.dtype == torch.float32
        torch.testing.assert_close(
            c.model_logprobs, model_logp.gather(1, index)[:, 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            c.logprobs, sampling_logp.gather(1, index)[:, 0], atol=1e-4, rtol=0
        )
        assert torch.isfinite(c.logprobs).all()


@pytest.mark.parametrize("top_p", [0.3, 0.9])
@pytest.mark.parametrize("scale", [8.0, 0.1])
def test_top_p_keeps_the_nucleus_like_transformers(top_p, scale):
    # Peaked rows (scale 8) find their nucleus among the top candidates, flat ones need a sort.
    torch.manual_seed(0)
    scores = torch.randn(4, 500) * scale
    expected = TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(engine_module._top_p(scores, top_p).isinf(), expected.isinf())


def test_same_seed_same_output_other_seed_other_output(llama):
    model, tokenizer = llama
    engine = Engine(model, tokenizer)
    prompts = encode(tokenizer, PROMPTS)

    def texts(seed):
        return [
            c.token_ids
            for c in engine.generate(prompts, SamplingParams(max_new_tokens=16, seed=seed))
        ]

    assert texts(5) == texts(5)
    assert texts(5) != texts(6)


def test_n_samples_share_a_prompt_and_differ(llama):
    model, tokenizer = llama
    prompts = encode(tokenizer, PROMPTS[:2])
    completions = no_stops(model, tokenizer).generate(
        prompts, SamplingParams(max_new_tokens=8, n=3, seed=0)
    )
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in completions[:3]}) == 3
    assert all(len(c.token_ids) == 8 for c in completions)


def swap_tokens(model, a: int, b: int) -> None:
    """Relabel tokens a and b in the embeddings and the output head: the model then writes b
    wherever it wrote a, and the other way round."""
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        weight.data[[a, b]] = weight.data[[b, a]]


@pytest.mark.parametrize("stop_token", ["eos", "end_of_turn"])
def test_stops_on_eos_and_end_of_turn(micro_model, stop_token):
    model, tokenizer = load_causal_lm(micro_model)
    stop_id = (
        tokenizer.eos_token_id
        if stop_token == "eos"
        else tokenizer.convert_tokens_to_ids(END_OF_TURN)
    )
    prompt = encode(tokenizer, PROMPTS[:1])[0]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    free = no_stops(model, tokenizer).generate([prompt], params)[0].token_ids
    k = next(i for i in range(2, 12) if free[i] not in free[:i] + prompt)
    swap_tokens(model, free[k], stop_id)  # now the model writes the stop token at step k
    relabel = {free[k]: stop_id, stop_id: free[k]}
    prompt = [relabel.get(t, t) for t in prompt]
    expected = [relabel.get(t, t) for t in free[: k + 1]]

    engine = Engine(model, tokenizer)
    assert stop_id in engine.stop_token_ids
    completion = engine.generate([prompt], params)[0]
    assert completion.token_ids == expected
    assert completion.finish_reason == "stop"
    assert completion.text == tokenizer.decode(expected[:-1], skip_special_tokens=True)
    assert len(completion.logprobs) == len(completion.model_logprobs) == k + 1


def test_stop_strings_cut_the_text(llama):
    model, tokenizer = llama
    engine = no_stops(model, tokenizer)
    prompt = encode(tokenizer, PROMPTS[:1])
    free = engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0))[0]
    stop = free.text[6:9]
    cut = free.text.find(stop)
    completion = engine.generate(
        prompt, SamplingParams(max_new_tokens=16, temperature=0, stop=[stop, "\x00never"])
    )[0]
    assert completion.finish_reason == "stop"
    assert completion.text == free.text[:cut]
    ids = completion.token_ids
    assert ids == free.token_ids[: len(ids)]
    # The last token completed the stop string; without it there was none.
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])


def test_max_new_tokens_and_a_prompt_too_long(llama):
    model, tokenizer = llama
    engine = no_stops(model, tokenizer)
    completion = engine.generate(encode(tokenizer, PROMPTS[:1]), SamplingParams(max_new_tokens=5))[
        0
    ]
    assert (len(completion.token_ids), completion.finish_reason) == (5, "length")
    with pytest.raises(UserError, match="context"):
        engine.generate([[5] * 500], SamplingParams(max_new_tokens=64))
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(n=0),
        dict(stop=[""]),
    ):
        with pytest.raises(UserError):
            engine.generate(encode(tokenizer, PROMPTS[:1]), SamplingParams(**bad))


def test_stream_yields_the_generated_text_and_stops_when_closed(llama):
    model, tokenizer = llama
    engine = Engine(model, tokenizer)
    prompt = encode(tokenizer, PROMPTS[:1])[0]
    free = no_stops(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=24, seed=3))
    stop = free[0].text[10:13]
    params = SamplingParams(max_new_tokens=24, seed=3, stop=[stop])
    stream, deltas = engine.stream(prompt, params), []
    with pytest.raises(StopIteration) as finished:
        while True:
            deltas.append(next(stream))
    assert len(deltas) > 1
    expected = engine.generate([prompt], params)[0]
    assert "".join(deltas) == expected.text == free[0].text[: free[0].text.find(stop)]
    streamed = finished.value.value  # the generator returns its Completion
    assert (streamed.token_ids, streamed.finish_reason) == (expected.token_ids, "stop")

    model.train()
    stream = engine.stream(prompt, SamplingParams(max_new_tokens=24, seed=3))
    next(stream)
    assert not model.training  # generation runs in eval mode...
    stream.close()
    assert model.training  # ...and closing the stream restores the mode
    model.eval()


def streamed(engine: Engine, token_ids: list[int], stop: list[str]) -> tuple[str, str]:
    """The text a stream of ``token_ids`` sends, delta by delta, and the response's text."""
    sequence, sent = Sequence(engine, SamplingParams(max_new_tokens=len(token_ids), stop=stop)), ""
    for token in token_ids:
        sequence.add(token, 0.0, 0.0)
        sent += sequence.new_text(sent)  # a half character sent early would stay in ``sent``
        if sequence.finished:
            break
    return sent, sequence.completion(0).text


def test_streamed_text_is_the_full_decode_across_split_characters_and_stop_strings(
    llama, monkeypatch
):
    model, tokenizer = llama
    engine = Engine(model, tokenizer)
    text = "naïve 日本 cat 🎉 sat . end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Byte-level BPE: some characters take several tokens, so some prefixes end mid-character.
    assert any(engine.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))
    assert engine.decode_stream() is not None  # decoded token by token
    cases = [
        ([], text),
        (["t 🎉 s"], "naïve 日本 ca"),
        (["本 c", "nothing"], "naïve 日"),
        (["ï"], "na"),
    ]
    for stop, expected in cases:
        assert streamed(engine, ids, stop) == (expected, expected)
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # random tokens: invalid bytes, broken characters, odd spaces
        tokens = [vocab[i] for i in torch.randint(len(vocab), (40,), generator=generator)]
        sent, whole = streamed(engine, tokens, [])
        assert sent == whole == engine.decode(tokens)
    monkeypatch.setattr(engine, "decode_stream", lambda: None)  # a slow tokenizer: decoded whole
    for stop, expected in cases:
        assert streamed(engine, ids, stop) == (expected, expected)


def test_batches_compact_and_chunk_without_changing_greedy_results(llama):
    model, tokenizer = llama
    texts = PROMPTS + ["sat", "mat is", "7 plus", "The", "2"]
    prompts = encode(tokenizer, texts)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    free = [c.token_ids for c in no_stops(model, tokenizer).generate(prompts, params)]
    # Rows stop at different steps (at least 3 of 8), so the batch drops finished rows.
    engine = Engine(model, tokenizer)
    engine.stop_token_ids = sorted({free[0][4], free[1][8], free[3][2]})
    expected = []
    for tokens in free:
        cut = next((i for i, t in enumerate(tokens) if t in engine.stop_token_ids), None)
        expected.append(tokens if cut is None else tokens[: cut + 1])
    whole = engine.generate(prompts, params)
    assert [c.token_ids for c in whole] == expected
    assert [c.finish_reason for c in whole] == [
        "stop" if len(e) < 12 or e[-1] in engine.stop_token_ids else "length" for e in expected
    ]
    engine.max_batch_size = 2
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected


def test_cache_is_sized_to_the_batch_and_longest_sequence(llama, monkeypatch):
    model, tokenizer = llama
    sizes = []

    class Recording(engine_module.KVCache):
        def __init__(self, num_layers, batch_size, max_len):
            sizes.append((batch_size, max_len))
            super().__init__(num_layers, batch_size, max_len)

    monkeypatch.setattr(engine_module, "KVCache", Recording)
    prompts = encode(tokenizer, PROMPTS)
    Engine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=7, n=2))
    assert sizes == [(6, max(len(p) for p in prompts) + 7)]


def test_peft_models_and_in_place_weight_updates_are_seen(micro_model):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_causal_lm(micro_model)
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    base = [c.token_ids for c in no_stops(model, tokenizer).generate(prompts, params)]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    engine = no_stops(peft_model, tokenizer)
    assert [c.token_ids for c in engine.generate(prompts, params)] == base  # LoRA B starts at 0
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)  # the adapters now change every answer
    assert engine.fused_weights() is not None  # LoRA folded into the fused decode step
    with_lora = [c.token_ids for c in engine.generate(prompts, params)]
    assert with_lora != base
    assert with_lora == hf_greedy(peft_model, prompts, engine.pad_token_id, 8)
    with peft_model.disable_adapter():
        assert [c.token_ids for c in engine.generate(prompts, params)] == base
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(-1)
    assert [c.token_ids for c in engine.generate(prompts, params)] != with_lora


def test_fused_weights_are_reused_until_a_weight_changes(micro_model, monkeypatch):
    from chatrl import engine as engine_module

    model, tokenizer = load_causal_lm(micro_model)
    built = []
    fuse = engine_module.fuse
    monkeypatch.setattr(engine_module, "fuse", lambda lm: built.append(1) or fuse(lm))
    engine = no_stops(model.eval(), tokenizer)
    engine.static_weights = True  # as load_engine makes it: nothing trains the model
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    first = [c.token_ids for c in engine.generate(prompts, params)]
    assert [c.token_ids for c in engine.generate(prompts, params)] == first
    assert len(built) == 1  # nothing changed: the fused copy is reused
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3)  # in place, as an optimiser step
    changed = [c.token_ids for c in engine.generate(prompts, params)]
    assert len(built) == 2
    assert changed == [c.token_ids for c in no_stops(model, tokenizer).generate(prompts, params)]
    assert changed != first
    engine.static_weights = False  # trained between calls: rebuilt every call
    before = len(built)
    engine.generate(prompts, params)
    engine.generate(prompts, params)
    assert len(built) == before + 2


def test_generate_chat_renders_the_template(llama):
    model, tokenizer = llama
    engine = no_stops(model, tokenizer)
    conversation = [{"role": "user", "content": "What is 2 plus 2?"}]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    from chatrl.chat_format import encode_prompt

    expected = engine.generate([encode_prompt(tokenizer, conversation)], params)[0].token_ids
    assert engine.generate_chat([conversation], params)[0].token_ids == expected


def test_compiled_decoding_matches_generate_and_sees_weight_updates(llama):
    # Qwen2 is Llama-like with grouped-query attention and q/k/v biases: all of the fused path.
    _, tokenizer = llama
    model = small_model("qwen2", len(tokenizer))
    prompts = encode(tokenizer, PROMPTS)
    engine = no_stops(model, tokenizer, compile=True)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    before = [c.token_ids for c in engine.generate(prompts, greedy)]
    assert before == hf_greedy(model, prompts, tokenizer.pad_token_id, 12)
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=3))
    for c in sampled:
        model_logp = forward_logprobs(model, prompts[c.prompt_index], c.token_ids)
        want = model_logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(c.model_logprobs, want, atol=1e-4, rtol=0)
    # Training updates weights in place between calls; the compiled step must read them.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(-1)
    after = [c.token_ids for c in engine.generate(prompts, greedy)]
    assert after != before
    assert after == [c.token_ids for c in no_stops(model, tokenizer).generate(prompts, greedy)]


def test_one_context_length_for_every_config():
    from types import SimpleNamespace

    from transformers import GPT2Config, LlamaConfig

    from chatrl.models import context_length

    assert context_length(LlamaConfig(max_position_embeddings=300)) == 300
    assert context_length(GPT2Config(n_positions=200)) == 200
    no_table = SimpleNamespace()
    assert context_length(no_table, SimpleNamespace(model_max_length=128)) == 128
    # transformers' "no limit" placeholder is no limit.
    assert context_length(no_table, SimpleNamespace(model_max_length=int(1e30))) is None
    assert context_length(no_table) is None
