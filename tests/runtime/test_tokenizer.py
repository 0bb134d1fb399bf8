"""Tokenizer wrapper: incremental detokenizing, stop strings held back, chat template fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.model.tokenizer import TextStream, Tokenizer


class CharTokenizer:
    """One token per character (id = code point), to drive TextStream exactly."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(ord(c)) for c in text]


@pytest.mark.unit
def test_stop_string_is_held_back_then_cut() -> None:
    stream = TextStream(CharTokenizer(), stop=("END",))
    deltas = feed(stream, "abEN")
    assert "".join(deltas) == "ab"  # "EN" may be the start of "END": held back
    assert feed(stream, "x") == ["ENx"]  # it was not
    assert feed(stream, "yEND") == ["y", "", "", ""]
    assert stream.stopped and stream.text == "abENxy"
    assert stream.push(ord("z")) == "" and stream.flush() == ""


@pytest.mark.unit
def test_held_text_is_flushed_when_the_request_ends_otherwise() -> None:
    stream = TextStream(CharTokenizer(), stop=("<|stop|>",))
    assert "".join(feed(stream, "hi <|st")) == "hi "
    assert stream.flush() == "<|st"
    assert not stream.stopped


@pytest.mark.unit
def test_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(CharTokenizer(), stop=("cd", "bcdx"))
    assert "".join(feed(stream, "abcd")) == "ab" and stream.stopped


@pytest.mark.unit
def test_incremental_text_equals_full_decode_with_multibyte_characters(model_dir: Path) -> None:
    tok = Tokenizer.load(model_dir)
    text = " The café serves crème brûlée ☕ and 東京 tea, 42 times."
    ids = tok.encode(text)[1:]  # drop BOS
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.unit
def test_chat_template_and_plain_fallback(model_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(model_dir)
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = tok.apply_chat_template(messages)
    bos = tok.hf.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert "Tell me a story." in tok.decode(ids)
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = Tokenizer.load(bare).apply_chat_template(messages)
    assert Tokenizer.load(bare).decode(plain) == "user: Tell me a story.\nassistant:"


def test_token_text_reads_as_decoded_text_not_bpe_pieces(tmp_path) -> None:
    from runtime.model.builtin import ensure_builtin_model
    from runtime.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(ensure_builtin_model(tmp_path / "m"))
    ids = list(tokenizer.hf(" the model", add_special_tokens=False)["input_ids"])
    pieces = [tokenizer.token_text(i) for i in ids]
    assert "".join(pieces) == " the model"
    assert not any("Ġ" in piece for piece in pieces)
