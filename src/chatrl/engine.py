"""The generation engine: every place where a model writes (sample, PPO rollouts, eval, chat,
serve) goes through ``Engine``.

It drives a Hugging Face causal LM's forward itself, one call per step, instead of going through
``model.generate()``'s generic machinery, because for the small models chatrl trains on a CPU the
per-step overhead is a large part of the cost:

- the KV cache is preallocated once per batch, sized to the batch and to the longest prompt plus
  ``max_new_tokens`` (never the model's context), and written in place (``KVCache``);
- prompts are left-padded; the attention mask is one additive tensor per batch, of which each
  step passes a view, so the model never builds masks itself;
- Llama, Mistral and Qwen2 models decode through ``llama_decode.py``, which calls the model's
  own modules without the generic forward's per-call machinery, with q/k/v and gate/up fused and
  the weights in the layout the CPU multiplies fastest; other models go through
  their forward with the same cache and mask;
- ``Engine(compile=True)`` compiles a whole decode step, model and sampling, with torch.compile
  (``bench/generate.py``: about 2.5x ``generate()`` at batch 16, against 1.7x uncompiled);
- sampling draws one uniform number per row and inverts the cumulative distribution, which is
  much cheaper on a CPU than ``torch.multinomial`` over the vocabulary;
- rows that finished are dropped from the batch once a quarter of it has finished;
- the ``n`` samples of a prompt share one prefill: its keys and values are copied ``n`` times.

Log-probabilities come from the same fp32 logits the token was drawn from, so they equal those of
a full forward pass over the finished sequence (up to float rounding): ``Completion.logprobs``
under the sampling distribution, ``Completion.model_logprobs`` under the untempered model (what
PPO's ratio needs).

The interface (``SamplingParams`` in, ``Completion`` out, token ids both ways) is narrow on
purpose, so that another backend (vLLM on a GPU) can stand behind it. Batching, the cache,
sampling, stop handling and streaming stay together here (the fused decode step is in
``llama_decode.py``): each changes the others' bookkeeping, hence the length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, CacheLayerMixin

from chatrl.chat_format import encode_prompt, stop_token_ids
from chatrl.data import Message
from chatrl.errors import UserError
from chatrl.llama_decode import LLAMA_LIKE, elementwise_attend, fuse, llama_decode
from chatrl.models import context_length, load_causal_lm

# Compact the batch once this fraction of its rows has finished: dropping rows copies the cache.
COMPACT_FRACTION = 0.25
# Top-p first looks for its nucleus among this many most likely tokens (exact when it fits there).
TOP_P_CANDIDATES = 64


@dataclass
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def check(self) -> None:
        """Raise UserError on settings that cannot work."""
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise UserError(f"n must be at least 1, got {self.n}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")


@dataclass
class Completion:
    """One generated response.

    ``token_ids`` include the end-of-turn/EOS token when generation stopped on one, or the tokens
    that completed a stop string; ``text`` is decoded without them (and cut before the stop
    string). ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the distribution it
    was drawn from (temperature, top-k and top-p applied; 0 for greedy decoding, whose choice is
    certain); ``model_logprobs[i]`` is the same token's log-probability under the untempered model,
    the one PPO needs. Both are float32. ``finish_reason`` is "stop" (stop token or string) or
    "length" (``max_new_tokens`` reached).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: torch.Tensor
    model_logprobs: torch.Tensor
    finish_reason: str


class _PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values in tensors allocated on first use and written in place.

    ``update`` returns views up to the current length, so attention never reads unused slots. A
    prefill with fewer rows than the cache (``n`` samples per prompt) is copied to each sample.
    """

    is_sliding = False

    def __init__(self, batch_size: int, max_len: int):
        super().__init__()
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.batch_size, key_states.shape[1], self.max_len)
        # Zeros, not empty: a compiled step attends over unwritten slots too (masked, but
        # garbage there could be NaN, and NaN survives the mask).
        self.keys = key_states.new_zeros(*shape, key_states.shape[3])
        self.values = value_states.new_zeros(*shape, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[2]
        repeats = self.keys.shape[0] // key_states.shape[0]
        if repeats > 1:
            self.keys[:, :, start:end] = key_states.repeat_interleave(repeats, 0)
            self.values[:, :, start:end] = value_states.repeat_interleave(repeats, 0)
            self.length = end
            return key_states, value_states
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len


class KVCache(Cache):
    """A transformers ``Cache`` of preallocated layers ``[batch, kv_heads, max_len, head_dim]``.

    The model's forward fills it through ``update``; Llama-like decode steps write their slot
    in place themselves (``llama_decode``), so ``length`` counts only the prefill for them.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int):
        super().__init__(
            layers=[_PreallocatedLayer(batch_size, max_len) for _ in range(num_layers)]
        )

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (in this order)."""
        for layer in self.layers:
            layer.select(rows)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    kth = scores.topk(min(k, scores.shape[-1])).values[:, -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``.

    Sorting the vocabulary is slow on a CPU, so the nucleus is first sought among the top
    ``TOP_P_CANDIDATES`` tokens; the full sort runs only for rows whose nucleus is larger (so
    each row's choice depends on that row alone, whatever its batch-mates).
    """
    candidates = min(TOP_P_CANDIDATES, scores.shape[-1])
    top = scores.topk(candidates).values
    probs = (top - scores.logsumexp(-1, keepdim=True)).exp()
    threshold = _nucleus_threshold(top, probs, p)
    wide = probs.sum(-1) < p
    if wide.any():
        full = scores[wide].sort(-1, descending=True).values
        threshold[wide] = _nucleus_threshold(full, full.softmax(-1), p)
    return scores.masked_fill(scores < threshold, float("-inf"))


def _nucleus_threshold(top: torch.Tensor, probs: torch.Tensor, p: float) -> torch.Tensor:
    """The lowest score kept, per row, of scores ``top`` sorted in descending order."""
    mass_before = probs.cumsum(-1) - probs
    kept = (mass_before < p).sum(-1, keepdim=True)
    return top.gather(-1, kept - 1)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` [rows, vocab].

    Returns the tokens, their log-probabilities under the sampling distribution, and under the
    untempered model (both float32).
    """
    return draw(
        logits, params.temperature, params.top_k, params.top_p, uniform(logits, params, generator)
    )


def uniform(logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor | None:
    """One number in (0, 1] per row of ``logits`` to draw with, or None for greedy decoding."""
    if params.temperature == 0:
        return None
    return 1 - torch.rand(len(logits), 1, generator=generator, device=logits.device)


def draw(logits, temperature: float, top_k: int, top_p: float, uniform):
    """``sample`` with its random numbers given (one per row, from ``uniform``): each row's
    token depends on that row's logits and number alone. (Given, so that torch.compile can
    trace it.)"""
    logits = logits.float()
    model_logp = logits.log_softmax(-1)
    if temperature == 0:
        tokens = logits.argmax(-1, keepdim=True)
        return tokens[:, 0], torch.zeros(len(tokens)), model_logp.gather(-1, tokens)[:, 0]
    scores = logits / temperature if temperature != 1 else logits
    if top_k:
        scores = _top_k(scores, top_k)
    if top_p < 1:
        scores = _top_p(scores, top_p)
    logp = model_logp if scores is logits else scores.log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    # The first index whose cdf reaches u * total always has non-zero probability.
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:])
    return tokens[:, 0], logp.gather(-1, tokens)[:, 0], model_logp.gather(-1, tokens)[:, 0]


def _decode_and_draw(decode_inputs, temperature, top_k, top_p, uniform):
    logits = llama_decode(*decode_inputs, attend=elementwise_attend)
    return draw(logits, temperature, top_k, top_p, uniform)


# torch.compile of a whole step, model and sampling (``Engine(compile=True)``): one graph for
# every step of a batch, because the step attends over all of the cache's slots (unwritten ones
# masked) and writes at an index tensor, so no shape changes from step to step. (Top-p's
# data-dependent branch splits it in two.)
_compiled_decode_and_draw = torch.compile(_decode_and_draw)


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) inside the block, its own mode again after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def last_logits(model, input_ids, mask, position_ids, cache: Cache) -> torch.Tensor:
    """The model's own forward over ``input_ids`` with an additive ``mask``, extending
    ``cache``; the logits of the last position [rows, vocab]."""
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def check_length(engine: Engine, prompt_len: int, max_new_tokens: int) -> None:
    """Raise UserError when a prompt and its response would not fit the model."""
    total = prompt_len + max_new_tokens
    context = engine.context_length
    if context and total > context:
        raise UserError(
            f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} "
            f"exceeds the model's context of {context} tokens"
        )
    window = getattr(engine.config, "sliding_window", None)
    if window and total > window:
        raise UserError(
            f"sequences longer than the model's sliding window ({window}) are not supported"
        )


def prefill_mask(valid: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask, as scores to add, of positions ``start:end`` of left-padded prompts
    (``valid`` [rows, width] is False at padding) over their slots ``0:end``:
    [rows, 1, end - start, end]."""
    query = torch.arange(start, end, device=valid.device)[:, None]
    key = torch.arange(end, device=valid.device)
    # Padding slots attend to themselves so that no attention row is empty (NaN otherwise).
    allowed = (key <= query) & valid[:, None, :end] | (key == query)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class Sequence:
    """One response being written: its tokens, their log-probabilities, and why it stopped
    (``finish_reason``: None while it runs)."""

    def __init__(self, engine: Engine, params: SamplingParams):
        self.engine, self.params = engine, params
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.model_logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.cut_text: str | None = None  # the text before a stop string, once one appeared
        self._decoder = engine.decode_stream()
        self._decoded, self._fed = "", 0  # the text of the first ``_fed`` tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float, model_logprob: float) -> None:
        """Append a drawn token; set ``finish_reason`` if it ends the response."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.model_logprobs.append(model_logprob)
        if token in self.engine.stop_token_set or self.params.stop and self._cut_at_stop_string():
            self.finish_reason = "stop"
        elif len(self.token_ids) == self.params.max_new_tokens:
            self.finish_reason = "length"

    def decoded(self) -> str:
        """The text of the tokens so far up to its last complete character, decoding only the
        tokens added since the last call: a streamed token costs the same however long the
        response is (a full decode every step would cost its length)."""
        if self._decoder is None:
            return self.engine.decode(self.token_ids).rstrip("\ufffd")
        backend = self.engine.tokenizer.backend_tokenizer
        for token in self.token_ids[self._fed :]:
            if piece := self._decoder.step(backend, token):
                self._decoded += piece
        self._fed = len(self.token_ids)
        return self._decoded

    def _cut_at_stop_string(self) -> bool:
        text = self.decoded()
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.cut_text = text[: min(hits)]
        return bool(hits)

    def text(self) -> str:
        """The response so far, without its stop token or stop string."""
        if self.cut_text is not None:
            return self.cut_text
        ids = self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids
        return self.engine.decode(ids)

    def new_text(self, sent: str) -> str:
        """What the response adds to ``sent`` (the text streamed so far) that is settled: text
        that could still become a stop string, or an incomplete UTF-8 character, is held back
        until the response has finished."""
        text = self.text() if self.finished else _settled(self.decoded(), self.params.stop)
        if len(text) > len(sent) and text.startswith(sent):
            return text[len(sent) :]
        return ""

    def completion(self, prompt_index: int) -> Completion:
        return Completion(
            prompt_index=prompt_index,
            token_ids=list(self.token_ids),
            text=self.text(),
            logprobs=torch.tensor(self.logprobs, dtype=torch.float32),
            model_logprobs=torch.tensor(self.model_logprobs, dtype=torch.float32),
            finish_reason=self.finish_reason,
        )


class _Batch:
    """One batched generation in progress: the cache, the masks and what each row wrote so far.

    Rows are prompt-major: row ``i * n + j`` is sample ``j`` of prompt ``i``. The model's batch
    holds the still-active rows, ``self.rows`` maps batch positions to rows.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, generator):
        self.engine, self.params, self.generator = engine, params, generator
        self.num_rows = len(prompts) * params.n
        self.prompt_len = max(len(p) for p in prompts)
        check_length(engine, self.prompt_len, params.max_new_tokens)
        total = self.prompt_len + params.max_new_tokens
        device = engine.device
        self.input_ids = torch.full(
            (len(prompts), self.prompt_len), engine.pad_token_id, device=device
        )
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        for i, prompt in enumerate(prompts):
            self.input_ids[i, self.prompt_len - len(prompt) :] = torch.tensor(prompt, device=device)
        self.valid = (
            torch.arange(self.prompt_len, device=device) >= self.prompt_len - lengths[:, None]
        )
        # The attention mask of every step, as scores to add: 0 where a slot holds a real token,
        # the dtype's minimum for left padding and slots not written yet.
        self.bias = torch.full(
            (self.num_rows, total), torch.finfo(engine.dtype).min, dtype=engine.dtype, device=device
        )
        self.bias[:, : self.prompt_len].masked_fill_(self.valid.repeat_interleave(params.n, 0), 0)
        self.positions = lengths.repeat_interleave(params.n)[:, None]
        self.cache = KVCache(engine.config.num_hidden_layers, self.num_rows, total)
        self.rows = list(range(self.num_rows))
        self.steps = 0  # tokens drawn per row so far
        self.last_tokens = torch.zeros(0)
        self.sequences = [Sequence(engine, params) for _ in range(self.num_rows)]
        self.fused = engine.fused_weights()
        self.compiled = engine.compile and self.fused is not None

    @property
    def done(self) -> bool:
        return all(sequence.finished for sequence in self.sequences)

    def _forward(self, input_ids, mask, position_ids) -> torch.Tensor:
        return last_logits(self.engine.model, input_ids, mask, position_ids, self.cache)

    @torch.inference_mode()
    def prefill(self) -> None:
        """Run the prompts through the model and draw every row's first token."""
        n, valid = self.params.n, self.valid
        mask = prefill_mask(valid, 0, self.prompt_len, self.bias.dtype)
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(self.input_ids, mask, position_ids)
        self._record(*sample(logits.repeat_interleave(n, 0), self.params, self.generator))

    @torch.inference_mode()
    def step(self) -> None:
        """Feed every active row its last token and draw the next one."""
        slot = self.prompt_len + self.steps - 1
        self.bias[:, slot] = 0
        if self.compiled:
            p, numbers = self.params, uniform(self.last_tokens, self.params, self.generator)
            inputs = self._decode_inputs(slot, self.bias[:, None, None])
            drawn = _compiled_decode_and_draw(inputs, p.temperature, p.top_k, p.top_p, numbers)
        else:
            drawn = sample(self._logits(slot), self.params, self.generator)
        self.positions = self.positions + 1
        self._record(*drawn)

    def _logits(self, slot: int) -> torch.Tensor:
        mask = self.bias[:, None, None, : slot + 1]
        if not self.engine.llama_like:
            return self._forward(self.last_tokens[:, None], mask, self.positions)
        # One query per row: the math kernel is several times faster than CPU flash attention
        # here (bench model, batch 16: 0.23 ms of a 13 ms step per layer).
        with sdpa_kernel([SDPBackend.MATH]):
            return llama_decode(*self._decode_inputs(slot, mask))

    def _decode_inputs(self, slot: int, mask: torch.Tensor) -> tuple:
        layers = self.cache.layers
        return (
            self.engine.base_model,
            self.last_tokens[:, None],
            mask,
            self.positions,
            self.fused,
            [layer.keys for layer in layers],
            [layer.values for layer in layers],
            torch.tensor([slot], device=mask.device),
        )

    def _record(self, tokens, logprobs, model_logprobs) -> None:
        self.steps += 1
        self.last_tokens = tokens
        drawn = zip(tokens.tolist(), logprobs.tolist(), model_logprobs.tolist(), strict=True)
        for row, (token, logprob, model_logprob) in zip(self.rows, drawn, strict=True):
            if not self.sequences[row].finished:
                self.sequences[row].add(token, logprob, model_logprob)
        active = [i for i, row in enumerate(self.rows) if not self.sequences[row].finished]
        # A compiled step keeps its batch: a new shape would compile again.
        if (
            active
            and not self.compiled
            and len(self.rows) - len(active) >= COMPACT_FRACTION * len(self.rows)
        ):
            self._keep(active)

    def _keep(self, positions: list[int]) -> None:
        """Drop finished rows from the model's batch."""
        index = torch.tensor(positions, device=self.bias.device)
        self.cache.select(index)
        self.bias, self.positions = self.bias[index], self.positions[index]
        self.last_tokens = self.last_tokens[index]
        self.rows = [self.rows[i] for i in positions]


class Engine:
    """Batched generation with a KV cache for any Hugging Face causal LM (LoRA-wrapped too).

    The engine holds references, never copies: weights updated in place by training are used by
    the next call. ``stop_token_ids`` (default: the template's end-of-turn token and every EOS
    of the tokenizer and the generation config) end a response; set it to an empty list to
    always generate ``max_new_tokens``. At most ``max_batch_size`` sequences
    (prompts times ``n``, but at least one prompt's ``n``) are generated at once; longer prompt
    lists run in chunks of prompts of similar length.

    ``compile=True`` decodes Llama-like models (without LoRA) through ``torch.compile``: about
    twice the tokens/s at batch 16 once compiled, but the first batch of each shape compiles for
    tens of seconds, so it pays for long sampling runs, not for a few prompts. Finished rows then
    stay in the batch until it ends.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 64,
        compile: bool = False,
        static_weights: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.static_weights = static_weights
        self.max_batch_size = max_batch_size
        self.compile = compile
        self.stop_token_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.pad_token_id = pad if pad is not None else 0
        implementation = getattr(self.config, "_attn_implementation", "sdpa")
        if implementation not in ("sdpa", "eager"):
            raise UserError(
                f"the engine supports sdpa and eager attention, not {implementation!r}; "
                "load the model with attn_implementation='sdpa'"
            )
        unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.llama_like = type(unwrapped).__name__ in LLAMA_LIKE
        self.base_model = unwrapped
        self._fused, self._fused_key = None, None

    @property
    def config(self):
        return self.model.config

    def fused_weights(self):
        """The fused decode projections of a Llama-like model (``llama_decode.fuse``).

        Building them copies every weight (SmolLM2-135M: 0.4 s, a fifth of a short sampling
        call), so with ``static_weights`` (nothing trains the model: ``load_engine``) they are
        kept until a weight changes in place (which bumps its version). Otherwise they are built
        anew every call: an optimiser step between two calls (PPO's) changes weights, and the
        fused AdamW kernel does so without bumping versions.
        """
        if not self.llama_like:
            return None
        if not self.static_weights:
            return fuse(self.base_model)
        key = tuple((p.data_ptr(), p._version) for p in self.base_model.parameters())
        if self._fused_key != key:
            self._fused, self._fused_key = fuse(self.base_model), key
        return self._fused

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt plus response) the model takes, where it says."""
        return context_length(self.config, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def stop_token_ids(self) -> list[int]:
        return self._stop_token_ids

    @stop_token_ids.setter
    def stop_token_ids(self, ids: list[int]) -> None:
        # The set is built here, once, not per token per row: decoding checks it every step.
        self._stop_token_ids, self.stop_token_set = list(ids), set(ids)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids as text, special tokens left out."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def decode_stream(self) -> DecodeStream | None:
        """An incremental decoder (tokenizers' ``DecodeStream``) whose text equals ``decode``'s;
        None for a tokenizer without a ``tokenizers`` backend (a slow one)."""
        if not hasattr(self.tokenizer, "backend_tokenizer"):
            return None
        return DecodeStream(skip_special_tokens=True)

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A random number generator on the model's device seeded with ``seed`` (None: None,
        torch's global one)."""
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Raise UserError on settings that cannot work or an empty prompt."""
        params.check()
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise UserError(f"prompt {i} is empty")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate ``params.n`` completions for each prompt (token ids, without padding).

        Prompt-major order: the ``n`` samples of prompt ``i`` are at ``[i * n:(i + 1) * n]``.
        """
        self.check(prompts, params)
        generator = self.generator(params.seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_batch = max(1, self.max_batch_size // params.n)
        results: list[list[Completion]] = [[] for _ in prompts]
        with eval_mode(self.model):
            for start in range(0, len(order), per_batch):
                chunk = order[start : start + per_batch]
                batch = _Batch(self, [prompts[i] for i in chunk], params, generator)
                batch.prefill()
                while not batch.done:
                    batch.step()
                for j, i in enumerate(chunk):
                    rows = range(j * params.n, (j + 1) * params.n)
                    results[i] = [batch.sequences[row].completion(i) for row in rows]
        return [completion for group in results for completion in group]

    def generate_chat(
        self, conversations: list[list[Message]], params: SamplingParams
    ) -> list[Completion]:
        """Render each conversation with the chat template (plus the assistant's generation
        prompt), then ``generate``."""
        prompts = [encode_prompt(self.tokenizer, messages) for messages in conversations]
        return self.generate(prompts, params)

    def stream(self, prompt: list[int], params: SamplingParams) -> Generator[str, None, Completion]:
        """Text deltas of one sample as its tokens are produced.

        Joined, the deltas equal the ``text`` that ``generate`` returns for the same prompt and
        seed. Text that could still become a stop string, or an incomplete UTF-8 character, is held
        back until it is settled. Closing the iterator stops generation. The generator returns
        the ``Completion`` (token ids, finish reason) as its ``StopIteration.value``.
        """
        if params.n != 1:
            raise UserError("stream produces one sample; use n=1")
        self.check([prompt], params)
        batch = _Batch(self, [prompt], params, self.generator(params.seed))
        sequence, sent = batch.sequences[0], ""
        with eval_mode(self.model):
            batch.prefill()
            while True:
                if delta := sequence.new_text(sent):
                    yield delta
                    sent += delta
                if batch.done:
                    return sequence.completion(0)
                batch.step()


def _settled(text: str, stop: list[str]) -> str:
    """The part of ``text`` (complete characters) that no later token can change: no tail that
    could be the start of a stop string."""
    held = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:size]):
                held = size
                break
    return text[: len(text) - held]


def load_engine(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    max_batch_size: int = 64,
) -> Engine:
    """The one way a command loads a model to generate with: the directory's causal LM in
    ``dtype``, in eval mode, on the GPU if there is one. ``threads`` sets torch's threads.

    A tokenizer without a chat template is refused here, before any sampling starts.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(model_dir, dtype)
    encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])  # no chat template: say so now
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Not requires_grad_(False): bf16 matrix products of frozen weights ran 25% slower here.
    model = model.to(device).eval()
    return Engine(model, tokenizer, max_batch_size=max_batch_size, static_weights=True)
