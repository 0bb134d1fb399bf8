"""ChunkWriter's plain token chunks (pre-encoded around the text) are byte for byte what the
general path writes, for chat and completions, every choice, and awkward text."""

from __future__ import annotations

import pytest

from gateway.api.openai_format import ChunkWriter
from runtime.protocol import TokenEvent

pytestmark = pytest.mark.unit

TEXTS = ["hi", " there", '\n"quoted"\\', "é\u2028😀", "", "\x00nul", "</script>"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize(("model", "n"), [("m", 1), ('we"ird\x00model', 3)])
def test_plain_token_chunks_equal_the_general_path(chat: bool, model: str, n: int) -> None:
    writer = ChunkWriter("id-1", model, chat=chat, logprobs=False, token_ids=False, n=n)
    for i, text in enumerate(TEXTS * n):
        index = i % n
        field = "delta" if chat else "text"
        want = writer._chunk({"index": index, "finish_reason": None, "logprobs": None,
                              field: {"content": text} if chat else text})
        assert writer.token(TokenEvent([7], text, None, index)) == want
    # Completions' logprob offsets still advance on the fast path.
    assert writer._offset == [sum(map(len, TEXTS))] * n
