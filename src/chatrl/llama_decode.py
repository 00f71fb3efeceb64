"""The engine's fast decode step for Llama-like models (Llama, Mistral, Qwen2).

One decode step calls the model's own modules (its norms, rotary embedding and projections)
directly instead of going through the generic forward, whose per-call machinery (masks, cache
bookkeeping, output classes) costs a large share of a small model's step on a CPU. q/k/v and
gate/up are fused into one product each, and fp32 weights are kept pre-transposed on a CPU
(``_Projection``). The engine (``engine.py``) owns the cache and sampling; this module knows only
the model's layers and token positions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Architectures whose decoder layer is Llama's (pre-norm, rotary, q/k/v/o projections, gated
# MLP): their decode steps skip the generic forward's per-call machinery (``llama_decode``).
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class _Projection:
    """A linear layer's weights in the layout its decode-step matrix product is fastest with.

    On a CPU in float32, MKL multiplies a few rows by a ``[in, out]`` matrix up to twice as fast
    as by the ``[out, in]`` one ``nn.Linear`` stores (bench model, 16 rows: 37 vs 72 us for
    q/k/v, 0.49 vs 0.81 ms for the head); in bfloat16 and on GPUs the layouts are even.
    """

    weight: torch.Tensor  # [in, out] when transposed, else [out, in]
    bias: torch.Tensor | None
    transposed: bool

    @classmethod
    def of(cls, *linears: tuple[torch.Tensor, torch.Tensor | None]) -> _Projection:
        """The (weight, bias) of linear layers side by side (one product for several)."""
        weight = torch.cat([w for w, _ in linears])
        bias = None
        if any(b is not None for _, b in linears):
            zeros = weight.new_zeros
            bias = torch.cat([zeros(len(w)) if b is None else b for w, b in linears])
        transposed = weight.dtype == torch.float32 and weight.device.type == "cpu"
        return cls(weight.t().contiguous() if transposed else weight, bias, transposed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else x @ self.weight + self.bias


@dataclass
class _FusedLayer:
    """One decoder layer's projections, q, k and v in one matrix and gate and up in another,
    so that a decode step runs four matrix products where it ran seven."""

    qkv: _Projection
    qkv_sizes: list[int]
    o: _Projection
    gate_up: _Projection
    down: _Projection


@dataclass
class _Fused:
    layers: list[_FusedLayer]
    head: _Projection


def applied_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The (weight, bias) a projection applies: a plain ``nn.Linear``'s, or a peft LoRA
    layer's, its active adapters' scaled B·A added (``get_delta_weight``), which is what its
    forward computes, in one matrix. None for anything else (quantised layers, LoRA variants
    such as DoRA, adapters with a bias): those decode unfused, through their own forward."""
    if type(layer) is torch.nn.Linear:
        return layer.weight, layer.bias
    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(layer, "get_delta_weight"):
        return None
    weight = base.weight
    if layer.disable_adapters or layer.merged:  # merged: the base weight holds the delta
        return weight, base.bias
    for name in (n for n in layer.active_adapters if n in layer.lora_A):
        if name in layer.lora_variant or layer.lora_B[name].bias is not None:
            return None
        weight = weight + layer.get_delta_weight(name)
    return weight, base.bias


@torch.inference_mode()
def fuse(lm) -> _Fused | None:
    """The fused projections of a Llama-like model, built from its current weights (once per
    batch: training between two calls changes them), LoRA adapters folded in. None when a
    projection's weight cannot be read as one matrix (``applied_weight``): that model decodes
    unfused."""
    layers = []
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        q, k, v, o, gate, up, down = weights = [applied_weight(lin) for lin in linears]
        if any(w is None for w in weights):
            return None
        layers.append(
            _FusedLayer(
                qkv=_Projection.of(q, k, v),
                qkv_sizes=[len(q[0]), len(k[0]), len(v[0])],
                o=_Projection.of(o),
                gate_up=_Projection.of(gate, up),
                down=_Projection.of(down),
            )
        )
    head = applied_weight(lm.lm_head)
    return None if head is None else _Fused(layers, _Projection.of(head))


def _sdpa_attend(q, keys, values, mask, scale) -> torch.Tensor:
    """Attention of one query per row: [rows, heads, 1, dim] over [rows, kv_heads, slots, dim]."""
    gqa = keys.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
    )


def elementwise_attend(q, keys, values, mask, scale) -> torch.Tensor:
    """``_sdpa_attend`` as products and sums, which torch.compile fuses into two loops; CPU
    flash attention costs several times more for one query (bench model: 0.26 ms a layer)."""
    rows, heads, _, dim = q.shape
    q = q.view(rows, keys.shape[1], -1, 1, dim)  # kv heads, the query heads that share them
    scores = (q * keys[:, :, None]).sum(-1) * scale + mask[:, :, None, 0]
    weights = scores.softmax(-1)[..., None]
    return (weights * values[:, :, None]).sum(-2).view(rows, heads, 1, dim)


def _write(cache: torch.Tensor, slot: torch.Tensor, new: torch.Tensor) -> None:
    """Write ``new`` [rows, heads, 1, dim] into ``cache`` [rows, heads, slots, dim] at ``slot``
    (one for all rows, or one per row)."""
    if len(slot) == 1:
        cache.index_copy_(2, slot, new)
    else:
        cache[torch.arange(len(slot), device=slot.device), :, slot] = new[:, :, 0]


def llama_decode(
    lm, input_ids, mask, position_ids, fused, keys, values, slot, attend=_sdpa_attend
) -> torch.Tensor:
    """One decode step of a Llama-like model: the model's own modules in the order its forward
    calls them, minus the mask construction, output capturing and keyword plumbing that cost as
    much as the arithmetic for small models; with ``fused`` projections (``fuse``), four matrix
    products per layer instead of seven, in the faster layout. The step's keys and values are
    written at ``slot`` of the preallocated ``keys``/``values``: a one-element index tensor (the
    same slot for every row) or one slot per row; attention reads as many slots as ``mask``
    [rows, 1, 1, slots] covers (``attend``). Returns the last position's logits."""
    inner = lm.model
    hidden = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(hidden, position_ids)
    rows, slots = hidden.shape[0], mask.shape[-1]
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        x = layer.input_layernorm(hidden)
        if fused:
            q, k, v = fused.layers[i].qkv(x).split(fused.layers[i].qkv_sizes, -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        k = k.view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        v = v.view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        _write(keys[i], slot, k)
        _write(values[i], slot, v)
        out = attend(q, keys[i][:, :, :slots], values[i][:, :, :slots], mask, attn.scaling)
        out = out.transpose(1, 2).reshape(rows, 1, -1)
        hidden = hidden + (fused.layers[i].o(out) if fused else attn.o_proj(out))
        x = layer.post_attention_layernorm(hidden)
        if fused:
            gate, up = fused.layers[i].gate_up(x).chunk(2, -1)
            hidden = hidden + fused.layers[i].down(mlp.act_fn(gate) * up)
        else:
            hidden = hidden + mlp(x)
    x = inner.norm(hidden[:, -1])
    return fused.head(x) if fused else lm.lm_head(x)
