"""``chatrl chat`` as a real subprocess on pipes: multi-turn, commands, Ctrl-C, Ctrl-D, and
control characters in replies shown escaped.

Greedy decoding makes every reply predictable: the engine, in this process, must write the
same text for the same conversation.
"""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatrl.data import load_conversations
from chatrl.engine import SamplingParams
from chatrl.serve.chat import printable

pytestmark = pytest.mark.slow

MAX_TOKENS = 400


class ChatProcess:
    """``python -m chatrl chat ARGS`` with its stdout collected as it comes."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                # fp32, as micro_engine: replies are compared token for token.
                [sys.executable, "-m", "chatrl", "chat", "--bf16", "false", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                # Ctrl-C as at a terminal: a suite started in the background (`cmd &`) ignores
                # SIGINT, the child would inherit that, and Python then never raises
                # KeyboardInterrupt.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        self.output, self.read_to = "", 0
        self.lock = threading.Lock()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            with self.lock:
                self.output += decoder.decode(chunk)

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait for ``text`` in the output not yet read; return the output up to its end."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = self.output.find(text, self.read_to)
                if found >= 0:
                    seen, self.read_to = (
                        self.output[self.read_to : found + len(text)],
                        found + len(text),
                    )
                    return seen
                unread = self.output[self.read_to :]
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"waited for {text!r}; got {unread!r}\nstderr: {self.log.read_text()}"
                )
            time.sleep(0.01)

    def send(self, line: str) -> None:
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()


def greedy(engine, messages):
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0)
    return engine.generate_chat([messages], params)[0]


def shown(completion) -> str:
    """What the chat prints for a reply, up to the next prompt."""
    note = "\n[reply cut at --max-tokens]" if completion.finish_reason == "length" else ""
    return f"{printable(completion.text)}{note}\n> "


def test_terminal_chat(micro_model, micro_engine, tmp_path):
    chat = ChatProcess(
        [str(micro_model), "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--threads", "1"],
        tmp_path / "stderr.log",
    )
    try:
        chat.expect("> ")
        # Multi-turn: the second reply answers the whole conversation, not its last line.
        story = [{"role": "user", "content": "tell me a story"}]
        first = greedy(micro_engine, story)
        chat.send("tell me a story")
        assert chat.expect(shown(first)) == shown(first)
        then = [
            *story,
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "and then?"},
        ]
        second = greedy(micro_engine, then)
        assert second.text != greedy(micro_engine, then[-1:]).text
        chat.send("and then?")
        assert chat.expect(shown(second)) == shown(second)
        chat.send(f"/save {tmp_path / 'story.jsonl'}")
        chat.expect(f"(saved 4 messages to {tmp_path / 'story.jsonl'})\n> ")
        saved = [*then, {"role": "assistant", "content": second.text}]
        assert load_conversations(tmp_path / "story.jsonl") == [saved]

        # A system message and a new conversation; Ctrl-C stops the (long) reply.
        chat.send("/system Answer briefly.")
        chat.expect("(system message: Answer briefly.)\n> ")
        chat.send("/reset")
        chat.expect("(new conversation)\n> ")
        hello = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "hello"},
        ]
        full = greedy(micro_engine, hello)
        assert full.finish_reason == "length"  # long enough to be interrupted
        # The chat runs in short slices between SIGSTOPs, so the reply cannot run to its end
        # while this process (slow to be scheduled on a busy machine) reads its first words.
        chat.send("hello")
        chat.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while len(chat.output) - chat.read_to < 3 and time.monotonic() < deadline:
            chat.process.send_signal(signal.SIGCONT)
            time.sleep(0.005)
            chat.process.send_signal(signal.SIGSTOP)
            time.sleep(0.02)  # the output written so far reaches the collector
        chat.process.send_signal(signal.SIGINT)  # handled first thing when it resumes
        chat.process.send_signal(signal.SIGCONT)
        printed = chat.expect("\n[stopped]\n> ").removesuffix("\n[stopped]\n> ")
        assert 0 < len(printed) < len(printable(full.text))
        assert printable(full.text).startswith(printed)
        chat.send(f"/save {tmp_path / 'stopped.jsonl'}")
        chat.expect(f"(saved 3 messages to {tmp_path / 'stopped.jsonl'})\n> ")
        [stopped] = load_conversations(tmp_path / "stopped.jsonl")
        assert stopped[:2] == hello and stopped[2]["role"] == "assistant"
        assert printable(stopped[2]["content"]) == printed  # what was shown stays, unescaped

        # Ctrl-C at the prompt abandons the line; the chat goes on.
        chat.process.send_signal(signal.SIGINT)
        chat.expect("\n> ")
        chat.send("/nonsense")
        chat.expect("unknown command /nonsense; /help lists them\n> ")
        chat.send("/help")
        assert "/save FILE" in chat.expect("Ctrl-D leaves.\n> ")

        # Ctrl-D (end of input) leaves.
        chat.process.stdin.close()
        assert chat.process.wait(timeout=30) == 0

        # The replies held control characters; the terminal got none of them raw.
        controls = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - {"\n", "\t"}
        assert controls & set(first.text + second.text + full.text)
        assert not controls & set(chat.output)
    finally:
        if chat.process.poll() is None:
            chat.process.kill()
            chat.process.wait()
