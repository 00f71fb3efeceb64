"""Continuous batching: one decode loop that requests join at a step boundary and leave when
they stop, so that a server's concurrent users share every decode step (``chatrl serve``).

``Engine.generate`` batches prompts known up front. A server's requests arrive while others
are being answered; ``ContinuousBatcher`` keeps one running batch instead:

- a newcomer's prompt goes through the model between decode steps, at most ``prefill_chunk``
  tokens a step (several short prompts share a chunk, a long one takes several steps), so that
  it stalls the running rows for one chunk at most; its keys and values are then copied into
  free rows of the batch's cache (``n`` samples: ``n`` rows, one prefill);
- every row has its own length: it writes its next key and value at its own slot and attends
  over its own slots only (the mask); a row that finishes or is cancelled gives its place to
  the batch's last row, so the model computes only live rows;
- every sample draws with its own ``torch.Generator`` (sample ``i`` of a request seeded with
  ``seed + i``), one number a step, so a seeded request writes the same text whatever else
  runs, and for ``n = 1`` the same text as ``Engine.generate`` alone.

Not thread-safe: one thread adds, cancels and steps (the server's generation worker).
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, CacheLayerMixin

from chatrl.engine import (
    Completion,
    Engine,
    KVCache,
    SamplingParams,
    Sequence,
    check_length,
    draw,
    eval_mode,
    last_logits,
    prefill_mask,
    uniform,
)
from chatrl.errors import UserError
from chatrl.llama_decode import llama_decode

# The cache grows by whole blocks of slots, so that most newcomers fit without a copy.
SLOT_BLOCK = 256


@dataclass(eq=False)
class Request:
    """A prompt being answered with ``params.n`` samples. ``cancelled`` may be set from any
    thread: the batcher drops the request at its next step."""

    prompt: list[int]
    params: SamplingParams
    stream: bool
    samples: list[_Sample] = field(default_factory=list)
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return all(sample.sequence.finished for sample in self.samples)

    def completions(self) -> list[Completion]:
        return [sample.sequence.completion(0) for sample in self.samples]


@dataclass(eq=False)
class _Sample:
    """Sample ``index`` of ``request``: what it wrote, its generator, the text streamed."""

    request: Request
    index: int
    sequence: Sequence
    generator: torch.Generator | None
    sent: str = ""

    @property
    def setting(self) -> tuple[float, int, float]:
        p = self.request.params
        return p.temperature, p.top_k, p.top_p


@dataclass
class Output:
    """What a step gave sample ``index`` of ``request``: new text (streamed requests only) and,
    once the sample has finished, its ``Completion``."""

    request: Request
    index: int
    text: str
    completion: Completion | None = None


class _Prefill:
    """Newcomers' prompts, left-padded into one batch, going through the model a chunk of
    positions at a time into a cache of their own."""

    def __init__(self, engine: Engine, requests: list[Request]):
        self.engine, self.requests = engine, requests
        self.width = max(len(r.prompt) for r in requests)
        device = engine.device
        self.input_ids = torch.full((len(requests), self.width), engine.pad_token_id)
        for i, request in enumerate(requests):
            self.input_ids[i, self.width - len(request.prompt) :] = torch.tensor(request.prompt)
        self.input_ids = self.input_ids.to(device)
        self.valid = self.input_ids.new_ones(self.input_ids.shape, dtype=torch.bool)
        for i, request in enumerate(requests):
            self.valid[i, : self.width - len(request.prompt)] = False
        self.positions = (self.valid.long().cumsum(-1) - 1).clamp(min=0)
        self.cache = KVCache(engine.config.num_hidden_layers, len(requests), self.width)
        self.done = 0  # positions through the model so far

    @property
    def rows(self) -> int:
        return sum(r.params.n for r in self.requests)

    def advance(self, budget: int) -> torch.Tensor | None:
        """Run the next ``budget`` tokens (at least one position of every prompt); the last
        position's logits [requests, vocab] once the prompts are through, else None."""
        start = self.done
        self.done = end = min(self.width, start + max(1, budget // len(self.requests)))
        mask = prefill_mask(self.valid, start, end, self.engine.dtype)
        logits = last_logits(
            self.engine.model,
            self.input_ids[:, start:end],
            mask,
            self.positions[:, start:end],
            self.cache,
        )
        return logits if end == self.width else None


class _RowLayer(CacheLayerMixin):
    """One layer of the running batch's cache, ``[rows, kv_heads, slots, head_dim]``, for a
    model's own forward: each row writes at its own slot (``_RowCache.at``)."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.slots, self.window = torch.zeros(1, dtype=torch.long), 1

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        rows = len(key_states)
        index = torch.arange(rows, device=key_states.device)
        self.keys[index, :, self.slots] = key_states[:, :, 0]
        self.values[index, :, self.slots] = value_states[:, :, 0]
        return self.keys[:rows, :, : self.window], self.values[:rows, :, : self.window]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window, 0

    def get_seq_length(self) -> int:
        return self.window - 1

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class _RowCache(Cache):
    """The running batch's keys and values: ``capacity`` rows of ``slots`` slots per layer."""

    def __init__(self, like: KVCache, capacity: int, slots: int):
        layers = []
        for layer in like.layers:
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            keys = layer.keys.new_zeros(capacity, heads, slots, dim)
            layers.append(_RowLayer(keys, torch.zeros_like(keys)))
        super().__init__(layers=layers)
        self.capacity, self.slots = capacity, slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def at(self, slots: torch.Tensor, window: int) -> None:
        """The next forward writes row ``i`` at ``slots[i]`` and attends over ``window`` slots."""
        for layer in self.layers:
            layer.slots, layer.window = slots, window

    def copy_from(self, old: _RowCache, rows: int, slots: int) -> None:
        """The first ``slots`` slots of the first ``rows`` rows of another cache."""
        for new, layer in zip(self.layers, old.layers, strict=True):
            new.keys[:rows, :, :slots] = layer.keys[:rows, :, :slots]
            new.values[:rows, :, :slots] = layer.values[:rows, :, :slots]

    def move(self, source: int, target: int) -> None:
        for layer in self.layers:
            layer.keys[target] = layer.keys[source]
            layer.values[target] = layer.values[source]


class ContinuousBatcher:
    """Answers requests added at any time in one running batch of at most ``max_batch_size``
    rows (samples) whose cache holds at most ``max_batch_tokens`` slots (rows times the longest
    row's prompt plus ``max_new_tokens``); requests wait, first come first served, while the
    batch has no room. ``prefill_chunk`` tokens of newcomers' prompts go through the model a
    step at most.

    Each ``step`` returns the ``Output``s it produced: a streamed request gets text as it
    settles, every request gets each sample's ``Completion`` when it finishes. A request's
    samples are seeded ``seed``, ``seed + 1``, ... (no seed: torch's global generator).
    """

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 64,
        max_batch_tokens: int = 65536,
        prefill_chunk: int = 512,
    ):
        self.engine, self.max_batch_size = engine, max_batch_size
        self.max_batch_tokens, self.prefill_chunk = max_batch_tokens, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.rows: list[_Sample] = []  # row i of the cache holds rows[i]
        self.steps = 0  # decode steps run
        self._prefill: _Prefill | None = None
        self._cache: _RowCache | None = None
        self._row_slots = 0  # slots the longest running row needs
        self._fused = None

    @property
    def cache_slots(self) -> int:
        """Slots the cache holds now: rows times slots a row, never above ``max_batch_tokens``."""
        return 0 if self._cache is None else self._cache.capacity * self._cache.slots

    @property
    def idle(self) -> bool:
        return not (self.waiting or self._prefill or self.rows)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise UserError for a request that can never run here (thread-safe)."""
        self.engine.check([prompt], params)
        check_length(self.engine, len(prompt), params.max_new_tokens)
        if params.n > self.max_batch_size:
            raise UserError(f"n={params.n} samples exceed the batch size {self.max_batch_size}")
        slots = params.n * (len(prompt) + params.max_new_tokens)
        if slots > self.max_batch_tokens:
            raise UserError(
                f"{params.n} samples of {len(prompt)} prompt tokens plus max_tokens="
                f"{params.max_new_tokens} need {slots} cache slots; the batch holds "
                f"{self.max_batch_tokens}"
            )

    def add(self, prompt: list[int], params: SamplingParams, stream: bool = False) -> Request:
        """Queue a request; it joins the batch at a coming step."""
        self.check(prompt, params)
        request = Request(prompt, params, stream)
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            generator = self.engine.generator(seed)
            request.samples.append(_Sample(request, i, Sequence(self.engine, params), generator))
        self.waiting.append(request)
        return request

    def step(self) -> list[Output]:
        """Drop cancelled requests, run a chunk of newcomers' prefill (they join the batch when
        theirs completes), then one decode step of every row."""
        self._drop_cancelled()
        outputs: list[Output] = []
        model = self.engine.model
        with torch.inference_mode(), eval_mode(model) if model.training else nullcontext():
            if self._prefill is None:
                self._prefill = self._admit()
            if self._prefill is not None:
                logits = self._prefill.advance(self.prefill_chunk)
                if logits is not None:
                    outputs += self._join(self._prefill, logits)
                    self._prefill = None
            if self.rows:
                outputs += self._decode()
        if not self.rows and self._prefill is None:
            self._fused = None  # weights may change before the next request
        return outputs

    def reset(self) -> None:
        """Drop every request (after a step failed halfway)."""
        self.waiting.clear()
        self.rows, self._row_slots = [], 0
        self._prefill, self._cache, self._fused = None, None, None

    def _drop_cancelled(self) -> None:
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.cancelled:
                self._remove(i)

    def _admit(self) -> _Prefill | None:
        """The waiting requests that fit in the batch and one prefill chunk, oldest first."""
        group: list[Request] = []
        rows, slots = len(self.rows), self._row_slots
        for request in self.waiting:
            n, p = request.params.n, request.params
            need = max(slots, len(request.prompt) + p.max_new_tokens)
            width = max(len(r.prompt) for r in [*group, request])
            if (
                rows + n > self.max_batch_size
                or (rows + n) * need > self.max_batch_tokens
                or group
                and (len(group) + 1) * width > self.prefill_chunk
            ):
                break
            group.append(request)
            rows, slots = rows + n, need
        if not group:
            return None
        for _ in group:
            self.waiting.popleft()
        return _Prefill(self.engine, group)

    def _join(self, prefill: _Prefill, logits: torch.Tensor) -> list[Output]:
        """Draw the newcomers' first tokens and give each unfinished sample a row."""
        samples, index = [], []
        for i, request in enumerate(prefill.requests):
            if not request.cancelled:
                samples += request.samples
                index += [i] * request.params.n
        if not samples:
            return []
        outputs = self._record(samples, logits[index])
        rows = [(s, i) for s, i in zip(samples, index, strict=True) if not s.sequence.finished]
        if rows:
            need = max(len(s.request.prompt) + s.request.params.max_new_tokens for s, _ in rows)
            self._reserve(len(self.rows) + len(rows), need, prefill.cache)
        for sample, i in rows:
            self._place(sample, prefill, i)
        return outputs

    def _reserve(self, rows: int, slots: int, like: KVCache) -> None:
        """Make the cache hold ``rows`` rows of ``slots`` slots, copying it if it must grow.

        It is allocated for as many rows as ``max_batch_tokens`` allows at its slots, so that it
        seldom grows (allocating is a large share of a short burst's time), and kept while idle.
        """
        self._row_slots = slots = max(self._row_slots, slots)
        old = self._cache
        if old is not None and rows <= old.capacity and slots <= old.slots:
            return
        slots = max(slots, min(-(-slots // SLOT_BLOCK) * SLOT_BLOCK, self.max_batch_tokens // rows))
        capacity = max(rows, min(self.max_batch_size, self.max_batch_tokens // slots))
        cache = _RowCache(like, capacity, slots)
        device = self.engine.device
        bias = torch.full(
            (capacity, slots), torch.finfo(self.engine.dtype).min, dtype=self.engine.dtype
        ).to(device)
        lengths = torch.zeros(capacity, dtype=torch.long, device=device)
        last = torch.zeros(capacity, dtype=torch.long, device=device)
        if old is not None:  # the live rows' slots, all within ``slots``
            live, kept = len(self.rows), min(old.slots, slots)
            cache.copy_from(old, live, kept)
            bias[:live, :kept] = self._bias[:live, :kept]
            lengths[:live], last[:live] = self._lengths[:live], self._last[:live]
        self._cache, self._bias, self._lengths, self._last = cache, bias, lengths, last

    def _place(self, sample: _Sample, prefill: _Prefill, i: int) -> None:
        """Put a newcomer in the next free row: its prompt's keys and values at slots
        ``0:len(prompt)`` (without the prefill's left padding), its first token to feed."""
        row, length = len(self.rows), len(sample.request.prompt)
        start = prefill.width - length
        for layer, new in zip(self._cache.layers, prefill.cache.layers, strict=True):
            layer.keys[row, :, :length] = new.keys[i, :, start:]
            layer.values[row, :, :length] = new.values[i, :, start:]
        self._bias[row] = torch.finfo(self._bias.dtype).min
        self._bias[row, :length] = 0
        self._lengths[row] = length
        self._last[row] = sample.sequence.token_ids[-1]
        self.rows.append(sample)

    def _decode(self) -> list[Output]:
        """Feed every row its last token at its own slot and draw the next one."""
        live = len(self.rows)
        lengths = self._lengths[:live]
        self._bias[torch.arange(live, device=lengths.device), lengths] = 0
        window = int(lengths.max()) + 1
        mask = self._bias[:live, None, None, :window]
        tokens, positions = self._last[:live, None], lengths[:, None]
        engine = self.engine
        if engine.llama_like:
            if self._fused is None:
                self._fused = engine.fused_weights()
            layers = self._cache.layers
            keys = [layer.keys[:live] for layer in layers]
            values = [layer.values[:live] for layer in layers]
            # One query per row: the math kernel is several times faster than CPU flash attention.
            with sdpa_kernel([SDPBackend.MATH]):
                inputs = (engine.base_model, tokens, mask, positions, self._fused)
                logits = llama_decode(*inputs, keys, values, lengths.clone())
        else:
            self._cache.at(lengths.clone(), window)
            logits = last_logits(engine.model, tokens, mask, positions, self._cache)
        self._lengths[:live] += 1
        self.steps += 1
        outputs = self._record(list(self.rows), logits)
        self._last[:live] = torch.tensor([s.sequence.token_ids[-1] for s in self.rows])
        for i in reversed(range(live)):
            if self.rows[i].sequence.finished:
                self._remove(i)
        return outputs

    def _record(self, samples: list[_Sample], logits: torch.Tensor) -> list[Output]:
        """Draw a token for each sample from its row of ``logits``, with its own settings and
        generator; the outputs that produces."""
        drawn = [(0, 0.0, 0.0)] * len(samples)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(sample.setting, []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            numbers = None
            if temperature > 0:
                # One number per sample from its own generator, as Engine.generate draws it.
                numbers = torch.cat(
                    [
                        uniform(logits[:1], samples[i].request.params, samples[i].generator)
                        for i in rows
                    ]
                )
            index = torch.tensor(rows, device=logits.device)
            result = draw(logits[index], temperature, top_k, top_p, numbers)
            for i, *values in zip(rows, *(t.tolist() for t in result), strict=True):
                drawn[i] = values
        outputs = []
        for sample, (token, logprob, model_logprob) in zip(samples, drawn, strict=True):
            sequence = sample.sequence
            sequence.add(token, logprob, model_logprob)
            text = sequence.new_text(sample.sent) if sample.request.stream else ""
            sample.sent += text
            completion = sequence.completion(0) if sequence.finished else None
            if text or completion:
                outputs.append(Output(sample.request, sample.index, text, completion))
        return outputs

    def _remove(self, row: int) -> None:
        """Free a row: the last row moves into it."""
        last = len(self.rows) - 1
        if row != last:
            self._cache.move(last, row)
            self._bias[row] = self._bias[last]
            self._lengths[row], self._last[row] = self._lengths[last], self._last[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self._row_slots = 0
        else:
            self._row_slots = max(
                len(s.request.prompt) + s.request.params.max_new_tokens for s in self.rows
            )
