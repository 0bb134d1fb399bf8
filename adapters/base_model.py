"""The base model's dimensions, read from its Hugging Face config.json, for upload checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Llama-family decoders whose projections carry these PEFT module names.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES
MAX_CONFIG_BYTES = 1024 * 1024


class BaseModelError(ValueError):
    """A config.json that does not describe a supported Llama-family model."""


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BaseModelError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class BaseModelSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseModelSpec:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BaseModelError(f"config.json: unsupported model_type {model_type!r}")
        hidden = _positive_int(config, "hidden_size")
        heads = _positive_int(config, "num_attention_heads")
        kv_heads = (
            _positive_int(config, "num_key_value_heads")
            if config.get("num_key_value_heads") is not None
            else heads
        )
        # transformers derives head_dim as hidden // heads when the config leaves it out.
        head_dim = (
            _positive_int(config, "head_dim")
            if config.get("head_dim") is not None
            else hidden // heads
        )
        if head_dim <= 0 or heads % kv_heads:
            raise BaseModelError("config.json: inconsistent head counts")
        return cls(
            hidden_size=hidden,
            intermediate_size=_positive_int(config, "intermediate_size"),
            num_hidden_layers=_positive_int(config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type=str(model_type),
        )

    @classmethod
    def from_config_file(cls, path: str | Path) -> BaseModelSpec:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise BaseModelError("config.json is larger than 1 MiB")
        try:
            config = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BaseModelError(f"config.json is not JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise BaseModelError("config.json is not a JSON object")
        return cls.from_config(config)

    def module_features(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection, as nn.Linear sees them."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        features = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        try:
            return features[module]
        except KeyError:
            raise BaseModelError(f"unknown module {module!r}") from None
