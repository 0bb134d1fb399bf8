"""The base model's tokenizer: prompts to ids, chat messages to ids, ids back to streamed text.

`TextStream` turns one request's new token ids into text deltas: it decodes incrementally
(a window of recent tokens, so per-token cost stays flat) and holds back text while it could
still be the start of a stop string or an incomplete multi-byte character.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Used when the tokenizer ships no chat template: role-tagged lines, then the assistant's turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Tokens decoded before the new ones so that merges and leading spaces come out right.
_CONTEXT_TOKENS = 6


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        # The Rust tokenizer under a fast HF tokenizer: decoding through it skips the Python
        # wrapper's per-call conversions, which dominate for the few ids a stream decodes.
        self._fast = getattr(hf_tokenizer, "_tokenizer", None)
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id

    @classmethod
    def load(cls, model_dir: Path) -> Tokenizer:
        from transformers import AutoTokenizer

        # Local files only: a model directory never triggers a download.
        return cls(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True))

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        template = None if getattr(self.hf, "chat_template", None) else PLAIN_CHAT_TEMPLATE
        text = self.hf.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        # The template already writes any BOS it wants; don't add a second one.
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        if self._fast is not None and not getattr(self.hf, "clean_up_tokenization_spaces", False):
            return self._fast.decode(token_ids, skip_special_tokens=True)
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """The token as text, as OpenAI's logprobs show it ("Ġword" reads " word").

        A token holding part of a multi-byte character decodes to U+FFFD; the gateway also
        sends its bytes.
        """
        return self.hf.decode([token_id], skip_special_tokens=False)


class TextStream:
    """Incremental detokenizer plus stop strings for one request's output."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # all decoded text so far (emitted + held back)
        self.num_emitted = 0  # characters of `text` already returned
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._read_offset = len(ids)
            self._prefix_offset = max(0, len(ids) - _CONTEXT_TOKENS)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            start = max(0, self.num_emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                return self._emit(len(self.text))
            return self._emit(len(self.text) - self._held_suffix())
        return self._emit(len(self.text))

    def _held_suffix(self) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        for n in range(min(len(self.text), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.num_emitted)
        delta = self.text[self.num_emitted : upto]
        self.num_emitted = upto
        return delta

    def flush(self) -> str:
        """At the end of the request: whatever was held back for a stop string that never came."""
        return self._emit(len(self.text))
