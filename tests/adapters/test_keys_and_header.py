"""Key format and hashing; the safetensors header parser under random input; config.json."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base_model import BaseModelError, BaseModelSpec
from adapters.errors import ValidationFailed
from adapters.keys import generate_key, hash_secret, parse_key, verify_secret
from adapters.safetensors_header import parse_header
from tests.support.adapter_files import encode_safetensors, lora_tensors

pytestmark = pytest.mark.unit


def test_generated_keys_parse_back_and_verify() -> None:
    keys = [generate_key() for _ in range(50)]
    assert len({k.prefix for k in keys}) == 50
    for key in keys:
        assert key.plaintext.startswith(f"lg_{key.prefix}_")
        prefix, secret = parse_key(key.plaintext) or ("", "")
        assert prefix == key.prefix and len(secret) >= 43  # 32 random bytes, base64url
        assert key.secret_hash == hash_secret(secret) != secret
        assert verify_secret(secret, key.secret_hash)
        assert not verify_secret(secret[:-1], key.secret_hash)
        assert key.plaintext not in repr(key)


@pytest.mark.parametrize(
    "bad",
    ["", "lg_", "lg_abc_secret", "xx_0123456789ab_secret", "lg_0123456789ab_", "lg_0123456789AB_s",
     "Bearer lg_0123456789ab_s", "lg_0123456789ab"],
)  # fmt: skip
def test_malformed_keys_do_not_parse(bad: str) -> None:
    assert parse_key(bad) is None


def test_header_offsets_are_absolute_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(encode_safetensors(lora_tensors(), metadata={"format": "pt"}))
    header = parse_header(path)
    assert header.metadata == {"format": "pt"}
    assert header.tensors[0].begin == header.data_start == 8 + header.header_bytes
    assert header.tensors[-1].end == header.file_size == path.stat().st_size
    assert all(a.end == b.begin for a, b in zip(header.tensors, header.tensors[1:], strict=False))


_GOOD = encode_safetensors(lora_tensors(rank=2, layers=1))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)).map(
            lambda p: _GOOD[: p[0]] + bytes([p[1]]) + _GOOD[p[0] + 1 :]
        ),
        st.integers(0, len(_GOOD)).map(lambda n: _GOOD[:n]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda obj: struct.pack("<Q", len(json.dumps(obj))) + json.dumps(obj).encode()),
    )
)
def test_parser_refuses_garbage_only_with_validation_failed(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        header = parse_header(path)
    except ValidationFailed:
        return
    # Whatever it accepted is self-consistent: tensors tile the data section exactly.
    cursor = header.data_start
    for tensor in header.tensors:
        assert tensor.begin == cursor
        cursor = tensor.end
    assert cursor == header.file_size == len(blob)


def test_base_model_spec_reads_llama_config(tmp_path: Path) -> None:
    config = {"model_type": "mistral", "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 3, "num_attention_heads": 8}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = BaseModelSpec.from_config_file(path)
    assert (spec.num_key_value_heads, spec.head_dim) == (8, 32)  # transformers' defaults
    assert spec.module_features("k_proj") == (256, 256)
    assert spec.module_features("down_proj") == (512, 256)
    path.write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(BaseModelError):
        BaseModelSpec.from_config_file(path)
    path.write_text(json.dumps({**config, "hidden_size": 0}))
    with pytest.raises(BaseModelError):
        BaseModelSpec.from_config_file(path)
