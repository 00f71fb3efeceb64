"""One way to make and load models: tokenizer training, size presets, policy/reward loading.

Every loader takes a model directory, a hub id or a GGUF file (``resolve_model``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from jinja2 import TemplateError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from chatrl.chat_format import CHATML_TEMPLATE, END_OF_TURN, assistant_spans
from chatrl.errors import UserError

CHATML_TOKENS = ["<|im_start|>", END_OF_TURN]
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", *CHATML_TOKENS]

# Llama-architecture size presets (parameter counts with the preset's default vocabulary).
PRESETS: dict[str, dict[str, int]] = {
    # ~1.2 M: unit tests.
    "micro": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1024,
    ),
    # ~3 M: fast experiments, the quick SFT sample.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=2048,
    ),
    # ~10 M: the demo.
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        vocab_size=2048,
    ),
    # 10.49 M: the benchmark model (REFERENCE.md), vocabulary 8192.
    "bench": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        vocab_size=8192,
    ),
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``: digits one per token, ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=CHATML_TOKENS,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def llama_config(preset: str, tokenizer, max_position_embeddings: int = 512) -> LlamaConfig:
    """The LlamaConfig of a size preset, sized to the tokenizer's vocabulary."""
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = {k: v for k, v in PRESETS[preset].items() if k != "vocab_size"}
    return LlamaConfig(
        **shape,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(
    preset: str,
    texts: list[str],
    out: str | Path,
    seed: int = 0,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
) -> Path:
    """Train a tokenizer on ``texts``, build a randomly initialised Llama model, save both."""
    tokenizer = train_tokenizer(
        texts, vocab_size or PRESETS.get(preset, {}).get("vocab_size", 2048)
    )
    config = llama_config(preset, tokenizer, max_position_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    save_model(model, tokenizer, out)
    return out


def save_model(model, tokenizer, out: str | Path) -> None:
    """Save an HF model directory (merging LoRA adapters first) with its tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# A model path ending in this is a GGUF file (llama.cpp's format), read through transformers.
GGUF_SUFFIX = ".gguf"


def cache_dir() -> Path:
    """Where chatrl keeps what it derives from the user's files: ``$CHATRL_CACHE``, by default
    ``~/.cache/chatrl``."""
    return Path(os.environ.get("CHATRL_CACHE") or Path.home() / ".cache" / "chatrl")


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The file's sha256 in hex, read in chunks (GGUF files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(path: str | Path) -> str | Path:
    """What to load for a model path: a GGUF file becomes an ordinary Hugging Face directory,
    dequantised to fp32 and cached under ``cache_dir()/gguf/<sha256 of the file>/``, converted
    the first time only; any other path or hub id is returned as it is.

    Every loader here calls it, so a ``.gguf`` file works wherever a model is asked for.
    """
    if not str(path).lower().endswith(GGUF_SUFFIX):
        return path
    source = Path(path)
    if not source.is_file():
        raise UserError(f"{path}: GGUF file not found")
    target = cache_dir() / "gguf" / file_sha256(source)
    if not (target / "config.json").exists():
        _convert_gguf(source, target)
    return target


def _convert_gguf(source: Path, target: Path) -> None:
    """Write ``source`` (GGUF) as an HF directory at ``target``, atomically: into a temporary
    directory beside it, renamed into place once complete, so a kill leaves no half directory
    at ``target``."""
    print(f"{source}: converting from GGUF to fp32, once, into {target}", file=sys.stderr)
    model, tokenizer = _read_gguf(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_model(model, tokenizer, temporary)
        try:
            temporary.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another process converted the same file meanwhile: keep its directory.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _read_gguf(source: Path):
    """The GGUF file's model, dequantised to fp32 in a plain (savable) model, and tokenizer."""
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise UserError(
            f"{source}: reading GGUF files needs the gguf package (pip install 'chatrl[real]')"
        )
    folder, name = str(source.parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # whatever fails here, it is the file transformers could not read
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: transformers cannot load this GGUF file: {reason}") from e
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"), though its weights
    # are dequantised already: a fresh model of its config, without the quantisation record,
    # takes them and saves as any other.
    config = model.config
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain, tokenizer


def _check_dir(path: str | Path) -> None:
    p = Path(path)
    if not p.exists() and ("/" in str(path) or str(path).startswith(".")):
        raise UserError(f"{path}: model directory not found")
    if p.exists() and not (p / "config.json").exists():
        raise UserError(f"{path}: not a model directory (no config.json)")


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """The tokenizer of a model directory, hub id or GGUF file, with a pad token and a chat
    template guaranteed: ``chat_template`` if given (``use_template``), else the tokenizer's
    own, else ChatML (``use_chatml``) for a base model's tokenizer that has none."""
    path = resolve_model(path)
    _check_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template is not None:
        use_template(tokenizer, chat_template)
    elif not getattr(tokenizer, "chat_template", None):
        use_chatml(tokenizer, path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_chatml(tokenizer, path: str | Path) -> None:
    """Give a tokenizer without a chat template (a base model, an encoder) ChatML, adding its
    ``<|im_start|>`` and ``<|im_end|>`` tokens where the vocabulary lacks them.

    Every stage loads tokenizers here, so all of them render one format, and the template
    (with the tokens) is saved with what they write; ``fit_embeddings`` grows the model.
    """
    missing = _set_template(tokenizer, CHATML_TEMPLATE)
    added = f", adding {' and '.join(missing)}" if missing else ""
    _say_once(f"{path}: no chat template; using ChatML{added}")


# The turn markers of the common chat formats: <|im_start|> (ChatML), <|eot_id|> (Llama 3),
# <|end|> (Phi-3), <start_of_turn> (Gemma).
_TURN_MARKER = re.compile(r"<\|[\w.-]+\|>|<(?:start|end)_of_turn>")


def _set_template(tokenizer, template: str) -> list[str]:
    """Install ``template``; its turn markers the vocabulary lacks become special tokens, so
    stopping and the loss mask see one token for each. Returns the tokens it added."""
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(_TURN_MARKER.findall(template)) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def use_template(tokenizer, spec: str) -> None:
    """Give the tokenizer the chat template ``spec`` names: ``chatml``, a Jinja file, or a
    model directory whose tokenizer's template to copy. Checked by rendering a conversation
    before any model is loaded; a template that fails is a one-line error naming it."""
    source = Path(spec)
    if spec == "chatml":
        template = CHATML_TEMPLATE
    elif source.is_dir():
        template = AutoTokenizer.from_pretrained(source).chat_template
        if not isinstance(template, str):
            raise UserError(f"{spec}: that tokenizer has no (single) chat template to use")
    elif source.is_file():
        template = source.read_text(encoding="utf-8")
    else:
        raise UserError(f"{spec}: chat template not found (give chatml, a Jinja file or a model)")
    _set_template(tokenizer, template)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    try:
        assistant_spans(tokenizer, conversation)
    except (TemplateError, UserError) as e:
        raise UserError(f"{spec}: the chat template does not render a conversation: {e}") from None


@functools.cache
def _say_once(message: str) -> None:
    """Print a notice on stderr once per process (a stage loads one tokenizer several times)."""
    print(message, file=sys.stderr)


def fit_embeddings(model, tokenizer) -> None:
    """Grow the model's embeddings (and tied head) to tokens the tokenizer added (ChatML's)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def load_causal_lm(
    path: str | Path, dtype: torch.dtype = torch.float32, chat_template: str | None = None
):
    """A causal LM and its tokenizer (from a model directory, hub id or GGUF file);
    ``chat_template`` names a template to use instead of its own (``load_tokenizer``)."""
    path = resolve_model(path)
    _check_dir(path)
    # First: a bad tokenizer or template fails before the model loads.
    tokenizer = load_tokenizer(path, chat_template)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    fit_embeddings(model, tokenizer)
    return model, tokenizer


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A one-output sequence-classification model (reward or value) and its tokenizer.

    A causal-LM checkpoint gets a fresh scalar head (that is how a reward model starts from
    the SFT model; a GGUF file is read as a causal LM, so it gets one too).
    """
    path = resolve_model(path)
    _check_dir(path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def context_length(config, tokenizer=None) -> int | None:
    """The most tokens (prompt plus response) a model takes: its position table
    (``max_position_embeddings``, GPT-2's ``n_positions``), else the tokenizer's limit when it
    sets a real one; None when neither says. The engine, the server and the reward model all
    read it here."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if positions:
        return positions
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if limit and limit < 1_000_000 else None


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer (TRL's ``disable_dropout_in_model``): PPO's log π must be the
    same in the rollout and the update (ratio 1), and a reward model trains without it (as TRL)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
