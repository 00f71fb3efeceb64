"""models.resolve_model's cache of converted GGUF files, with the GGUF reader faked by the micro
model (tests/test_real.py reads a real GGUF file): converted once per file content, written
atomically, shared between processes that convert at once."""

from __future__ import annotations

import hashlib

import pytest
import torch

from chatrl.errors import UserError
from chatrl.models import file_sha256, load_causal_lm, load_tokenizer, resolve_model


@pytest.fixture
def reads(micro_model, tmp_path, monkeypatch):
    """The GGUF files "read" (each as the micro model), in a cache of the test's own."""
    monkeypatch.setenv("CHATRL_CACHE", str(tmp_path / "cache"))
    calls = []

    def read(source):
        calls.append(source)
        return load_causal_lm(micro_model)

    monkeypatch.setattr("chatrl.models._read_gguf", read)
    return calls


def gguf_file(path, content=b"not really GGUF"):
    path.write_bytes(content)
    return path


def test_a_gguf_file_is_converted_once_per_content(reads, micro_model, tmp_path):
    first = gguf_file(tmp_path / "a.gguf")
    target = resolve_model(first)
    assert target == tmp_path / "cache" / "gguf" / hashlib.sha256(b"not really GGUF").hexdigest()
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()
    model, tokenizer = load_causal_lm(first)  # a loader resolves it too: no new conversion
    assert load_tokenizer(first).get_vocab() == tokenizer.get_vocab()
    micro, _ = load_causal_lm(micro_model)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), micro.parameters(), strict=True)
    )
    (tmp_path / "elsewhere").mkdir()
    copy = gguf_file(tmp_path / "elsewhere" / "b.GGUF")
    assert resolve_model(copy) == target  # the same content under another name
    assert reads == [first]
    other = gguf_file(tmp_path / "c.gguf", b"other content")
    assert resolve_model(other) != target and reads == [first, other]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_conversion_killed_while_writing_leaves_no_directory(reads, tmp_path, monkeypatch):
    from chatrl import models

    path = gguf_file(tmp_path / "a.gguf")
    save = models.save_model

    def killed(model, tokenizer, out):
        save(model, tokenizer, out)  # config.json and the weights are written by now
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(models, "save_model", killed)
        with pytest.raises(KeyboardInterrupt):
            resolve_model(path)
    assert not list((tmp_path / "cache" / "gguf").iterdir())
    target = resolve_model(path)  # converted afresh
    assert (target / "config.json").exists() and len(reads) == 2


def test_a_conversion_finished_meanwhile_elsewhere_is_kept(reads, tmp_path, monkeypatch):
    from chatrl import models

    path = gguf_file(tmp_path / "a.gguf")
    target = tmp_path / "cache" / "gguf" / file_sha256(path)
    read = models._read_gguf

    def read_while_another_process_finishes(source):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return read(source)

    monkeypatch.setattr(models, "_read_gguf", read_while_another_process_finishes)
    assert resolve_model(path) == target
    assert (target / "config.json").read_text() == "{}"  # theirs, not replaced
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # ours removed


def test_other_paths_pass_through_and_a_missing_gguf_file_is_a_user_error(tmp_path):
    assert resolve_model("org/some-model") == "org/some-model"
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(UserError, match="missing.gguf: GGUF file not found"):
        load_causal_lm(tmp_path / "missing.gguf")
