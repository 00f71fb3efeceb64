"""``chatrl chat``: a conversation with a model in the terminal.

Replies stream as they are generated and the conversation is kept across turns. Lines that
start with ``/`` are commands (``/help`` lists them). Ctrl-C stops a reply, whose shown part
stays in the conversation; Ctrl-D leaves. With ``seed`` set, the k-th reply of a session is
sampled with ``seed + k``, so the same session replays the same replies.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

from chatrl.chat_format import encode_prompt
from chatrl.data import Message, write_jsonl
from chatrl.engine import Completion, Engine, SamplingParams

HELP = """\
/reset        start a new conversation (the system message stays)
/system TEXT  set the system message (/system alone removes it)
/save FILE    write the conversation to FILE as one SFT JSONL record
/help         this list
Ctrl-C stops a reply; Ctrl-D leaves."""


# Control characters a reply may hold are shown escaped (\x1b), so that no reply can move the
# cursor, clear the screen or retitle the terminal. Newlines and tabs print as themselves.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """``text`` as the terminal shows it: control characters escaped."""
    return text.translate(_CONTROLS)


def say(text: str) -> None:
    print(text, flush=True)


class TerminalChat:
    """The state of one terminal conversation and what each line typed does to it."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.turns: list[Message] = []
        self.replies = 0

    @property
    def messages(self) -> list[Message]:
        """The conversation as the model sees it: the system message, then the turns."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def handle(self, line: str) -> None:
        """Answer a typed line: a command, or a message to reply to."""
        if line.startswith("/"):
            self.command(*line.partition(" ")[::2])
        else:
            self.reply_to(line)

    def command(self, name: str, argument: str) -> None:
        argument = argument.strip()
        if name == "/reset":
            self.turns = []
            say("(new conversation)")
        elif name == "/system":
            self.system = argument or None
            say(f"(system message: {argument})" if argument else "(no system message)")
        elif name == "/save":
            self.save(argument)
        elif name == "/help":
            say(HELP)
        else:
            say(f"unknown command {name}; /help lists them")

    def save(self, path: str) -> None:
        if not path:
            say("usage: /save FILE")
        elif not any(m["role"] == "assistant" for m in self.turns):
            say("nothing to save yet: an SFT record needs an assistant reply")
        else:
            try:
                write_jsonl(Path(path), [{"messages": self.messages}])
            except OSError as e:
                say(f"cannot write {path}: {e.strerror}")
                return
            say(f"(saved {len(self.messages)} messages to {path})")

    def reply_to(self, text: str) -> None:
        """Stream the model's reply to ``text``; Ctrl-C stops it."""
        self.turns.append({"role": "user", "content": text})
        prompt = encode_prompt(self.engine.tokenizer, self.messages)
        context = self.engine.context_length
        room = self.params.max_new_tokens if context is None else context - len(prompt)
        if room < 1:
            self.turns.pop()
            say(f"(the conversation fills the model's context of {context} tokens: /reset)")
            return
        seed = None if self.params.seed is None else self.params.seed + self.replies
        params = replace(
            self.params, max_new_tokens=min(self.params.max_new_tokens, room), seed=seed
        )
        self.replies += 1
        stream = self.engine.stream(prompt, params)
        parts: list[str] = []
        note = None
        try:
            completion = _print_stream(stream, parts)
            note = "[reply cut at --max-tokens]" if completion.finish_reason == "length" else None
        except KeyboardInterrupt:
            stream.close()
            note = "[stopped]"
        self.turns.append({"role": "assistant", "content": "".join(parts)})
        say("" if note is None else f"\n{note}")


def _print_stream(stream: Generator[str, None, Completion], parts: list[str]) -> Completion:
    """Print the deltas of ``stream`` as they come, keeping them in ``parts``; return its end."""
    while True:
        try:
            part = next(stream)
        except StopIteration as end:
            return end.value
        parts.append(part)
        print(printable(part), end="", flush=True)


def run_chat(engine: Engine, params: SamplingParams, system: str | None = None) -> None:
    """Chat on stdin/stdout until end of input (Ctrl-D)."""
    # A reply can hold any character; a terminal that cannot show one gets a "?", not a crash.
    sys.stdout.reconfigure(errors="replace")
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    chat = TerminalChat(engine, params, system)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # as at Python's prompt: Ctrl-C abandons the line
            print()
            continue
        if line.strip():
            chat.handle(line.strip())
