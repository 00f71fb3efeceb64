"""Data formats shared by every stage, their loaders, validation and atomic writers.

Formats (JSONL, one record per line; see docs/formats.md):

- SFT conversations: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}``
- Prompts: ``{"messages": [...]}`` ending in a user turn; an optional ``"meta"`` object is
  carried along untouched (the bundled world keeps its task description there).
- Plain text for pretraining: a ``.txt`` file (one document per line) or JSONL ``{"text": ...}``.
- Tasks (what ``chatrl sample`` writes): ``{"prompt": [messages], "responses": [str, ...]}``
  plus optional ``"id"`` and ``"meta"``.
- Rankings: ``{"prompt": [messages], "responses": [str, ...], "ranking": [i, ...]}`` where
  ``ranking`` lists response indices best first (a permutation of ``range(K)``), plus optional
  ``"annotator"``, ``"id"`` and ``"meta"``.
- Pairwise preferences load into rankings with K = 2: TRL's ``prompt``/``chosen``/``rejected``
  (standard strings or conversational message lists, explicit or implicit prompt) and
  Anthropic HH-RLHF's ``chosen``/``rejected`` transcripts (``\\n\\nHuman: … \\n\\nAssistant: …``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatrl.errors import UserError

# Annotator names of model rankers (`chatrl teacher rank`): "teacher:MODEL".
TEACHER_PREFIX = "teacher:"

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class Ranking:
    """K responses to one prompt, ranked best first (``ranking`` holds response indices).

    ``annotator`` names who ranked them; a name starting with ``TEACHER_PREFIX`` is a model
    (``chatrl teacher rank``), which the labeling app's statistics compare with people.
    """

    prompt: list[Message]
    responses: list[str]
    ranking: list[int]
    annotator: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # "file:line" it was read from, for messages about it

    def pairs(self) -> list[tuple[int, int]]:
        """All K(K-1)/2 (better, worse) index pairs implied by the ranking."""
        order = self.ranking
        return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "prompt": self.prompt,
            "responses": self.responses,
            "ranking": self.ranking,
        }
        if self.annotator is not None:
            record["annotator"] = self.annotator
        if self.meta:
            record["meta"] = self.meta
        return record


# ---------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; bad lines raise UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (truncated last line?)" if number == len(text.splitlines()) else ""
            raise UserError(f"{path}:{number}: invalid JSON{hint}: {e.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _where(path: Path | str, line: int) -> str:
    return f"{path}:{line}"


def validate_messages(messages: Any, where: str, field_name: str = "messages") -> list[Message]:
    """Check an OpenAI-style message list; return it with only role/content kept."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {field_name} must be a non-empty list of messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: {field_name}[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: {field_name}[{i}].role must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise UserError(f"{where}: {field_name}[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    return clean


def load_conversations(path: str | Path) -> list[list[Message]]:
    """SFT data: conversations that each hold at least one assistant turn."""
    conversations = []
    for line, record in read_jsonl(path):
        where = _where(path, line)
        messages = validate_messages(record.get("messages"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: messages has no assistant turn to learn from")
        conversations.append(messages)
    return conversations


@dataclass
class Prompt:
    """A conversation that ends in a user turn, waiting for the assistant's reply."""

    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"messages": self.messages}
        if self.meta:
            record["meta"] = self.meta
        return record


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompt sets: ``{"messages": [...]}`` ending in a user turn (TRL's ``prompt`` key too)."""
    prompts = []
    for line, record in read_jsonl(path):
        where = _where(path, line)
        key = "messages" if "messages" in record else "prompt"
        raw = record.get(key)
        if isinstance(raw, str):
            raw = [{"role": "user", "content": raw}]
        messages = validate_messages(raw, where, key)
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: {key} must end with a user turn")
        meta = record.get("meta") or {}
        if not isinstance(meta, dict):
            raise UserError(f"{where}: meta must be an object")
        prompts.append(Prompt(messages, meta))
    return prompts


def load_text(path: str | Path) -> list[str]:
    """Pretraining text: .txt (one document per non-blank line) or JSONL ``{"text": ...}``."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.exists():
            raise UserError(f"{path}: file not found")
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
        if not lines:
            raise UserError(f"{path}: file is empty")
        return lines
    texts = []
    for line, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise UserError(f"{_where(path, line)}: text must be a non-empty string")
        texts.append(text)
    return texts


def _check_ranking(ranking: Any, k: int, where: str) -> list[int]:
    if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
        raise UserError(
            f"{where}: ranking must be a permutation of 0..{k - 1} (response indices, best first)"
        )
    return ranking


def _check_responses(responses: Any, where: str) -> list[str]:
    if not isinstance(responses, list) or len(responses) < 2:
        raise UserError(f"{where}: responses must be a list of at least 2 strings")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise UserError(f"{where}: responses[{i}] must be a string")
    return responses


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_transcript(text: str, where: str) -> list[Message]:
    """Split an Anthropic HH-RLHF transcript into messages."""
    if not text.startswith(HH_HUMAN):
        text = "\n\n" + text.lstrip("\n") if text.lstrip("\n").startswith("Human:") else text
    messages: list[Message] = []
    rest = text
    while rest:
        if rest.startswith(HH_HUMAN):
            role, rest = "user", rest[len(HH_HUMAN) :]
        elif rest.startswith(HH_ASSISTANT):
            role, rest = "assistant", rest[len(HH_ASSISTANT) :]
        else:
            raise UserError(
                f"{where}: HH transcript must alternate '\\n\\nHuman:' and '\\n\\nAssistant:'"
            )
        cut = min(
            (i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0), default=len(rest)
        )
        messages.append({"role": role, "content": rest[:cut].strip()})
        rest = rest[cut:]
    return messages


def _common_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _as_completion(value: Any, where: str, name: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return validate_messages(value, where, name)


def _preference_to_ranking(record: dict[str, Any], where: str) -> Ranking:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    prompt = record.get("prompt")
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        # Anthropic HH-RLHF: two full transcripts sharing every turn but the last.
        chosen_msgs = parse_hh_transcript(chosen, where)
        rejected_msgs = parse_hh_transcript(rejected, where)
    elif prompt is None:
        # TRL conversational, implicit prompt: the shared prefix is the prompt.
        chosen_msgs = validate_messages(chosen, where, "chosen")
        rejected_msgs = validate_messages(rejected, where, "rejected")
    else:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt_msgs = validate_messages(prompt, where, "prompt")
        chosen_msgs = prompt_msgs + _as_completion(chosen, where, "chosen")
        rejected_msgs = prompt_msgs + _as_completion(rejected, where, "rejected")
    shared = _common_prefix(chosen_msgs, rejected_msgs)
    # The prompt is everything before the final assistant turn of each side.
    shared = min(shared, len(chosen_msgs) - 1, len(rejected_msgs) - 1)
    prompt_msgs = chosen_msgs[:shared]
    chosen_tail, rejected_tail = chosen_msgs[shared:], rejected_msgs[shared:]
    if not prompt_msgs or prompt_msgs[-1]["role"] != "user":
        raise UserError(
            f"{where}: chosen and rejected must share a prompt that ends in a user turn"
        )
    for name, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            raise UserError(
                f"{where}: {name} must end in exactly one assistant turn after the prompt"
            )
    if chosen_tail[0]["content"] == rejected_tail[0]["content"]:
        raise UserError(f"{where}: chosen and rejected are the same response")
    return Ranking(prompt_msgs, [chosen_tail[0]["content"], rejected_tail[0]["content"]], [0, 1])


def load_rankings(path: str | Path) -> list[Ranking]:
    """Rankings, TRL preference pairs or HH-RLHF pairs, all as Ranking objects."""
    rankings = []
    for line, record in read_jsonl(path):
        where = _where(path, line)
        if "chosen" in record or "rejected" in record:
            rankings.append(_preference_to_ranking(record, where))
            rankings[-1].source = where
            continue
        prompt = validate_messages(record.get("prompt"), where, "prompt")
        if prompt[-1]["role"] != "user":
            raise UserError(f"{where}: prompt must end with a user turn")
        responses = _check_responses(record.get("responses"), where)
        ranking = _check_ranking(record.get("ranking"), len(responses), where)
        if len(set(responses)) < len(responses):
            raise UserError(f"{where}: responses must be distinct (two ranked responses are equal)")
        annotator = record.get("annotator")
        meta = record.get("meta") or {}
        rankings.append(Ranking(prompt, responses, ranking, annotator, meta, source=where))
    return rankings


@dataclass
class Task:
    """A prompt with K candidate responses waiting to be ranked (what ``chatrl sample`` writes)."""

    prompt: list[Message]
    responses: list[str]
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Identity for idempotent imports and resumed runs: the id if there is one, else the
        content (prompt and responses)."""
        basis = {"id": self.id} if self.id is not None else [self.prompt, self.responses]
        return hashlib.sha256(json.dumps(basis, ensure_ascii=False).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"prompt": self.prompt, "responses": self.responses}
        if self.id is not None:
            record["id"] = self.id
        if self.meta:
            record["meta"] = self.meta
        return record


def load_tasks(path: str | Path) -> list[Task]:
    """Ranking tasks: ``{"prompt": [...], "responses": [...]}`` with optional id and meta."""
    tasks = []
    for line, record in read_jsonl(path):
        where = _where(path, line)
        prompt = validate_messages(record.get("prompt"), where, "prompt")
        responses = _check_responses(record.get("responses"), where)
        task_id = record.get("id")
        tasks.append(
            Task(
                prompt,
                responses,
                None if task_id is None else str(task_id),
                record.get("meta") or {},
            )
        )
    return tasks


# ---------------------------------------------------------------- writing


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temporary file beside ``path`` and rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSONL; return how many were written."""
    count = 0
    with atomic_write(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write one JSON document (indented, for people to read)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_json_file(path: str | Path) -> Any:
    """One JSON document (a config or state file chatrl wrote); errors name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON: {e}") from None
