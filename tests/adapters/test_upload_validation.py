"""Every upload rule with a crafted bad file: refused, and no catalog row or object remains."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from adapters.catalog import Catalog
from adapters.errors import StorageUnavailable, TooLarge, ValidationFailed
from tests.support.adapter_files import (
    count_rows,
    encode_safetensors,
    lora_config,
    lora_tensors,
    raw_safetensors,
    stored_objects,
    write_adapter,
)

pytestmark = pytest.mark.unit
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _q_only(**kw) -> dict[str, np.ndarray]:
    return lora_tensors(modules=("q_proj",), **kw)


def _replace(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    tensors = lora_tensors()
    tensors[name] = array
    return tensors


def _poisoned(value: float, dtype: str = "F32") -> dict[str, np.ndarray]:
    tensors = lora_tensors(dtype=dtype)
    tensors[B] = tensors[B].copy()
    tensors[B][3, 1] = value
    return tensors


def _bf16_nan() -> dict[str, np.ndarray]:
    tensors = {}
    for name, array in lora_tensors().items():
        bits = (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        tensors[name] = bits
    tensors[A][0, 0] = 0x7FC0  # a bfloat16 quiet NaN
    return tensors


def _header(entries: dict, data: bytes, **kw) -> bytes:
    return raw_safetensors(json.dumps(entries).encode(), data, **kw)


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _pickle() -> bytes:
    return pickle.dumps({A: [[0.0] * 64] * 4}, protocol=4)


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", _pickle())
    return buffer.getvalue()


GOOD = encode_safetensors(lora_tensors())
# (config, model, expected words of the reason); None means the good default.
BAD_MODELS: dict[str, tuple[object, Callable[[], object], str]] = {
    "truncated_length": (None, lambda: b"\x10\x00\x00", "truncated"),
    "truncated_data": (None, lambda: GOOD[:-10], "data section"),
    "header_length_past_end": (
        None,
        lambda: raw_safetensors(b"{}", b"", declared_length=4096),
        "past the end",
    ),
    "header_oversized": (
        None,
        lambda: raw_safetensors(b"{}", b"", declared_length=200 * 1024 * 1024),
        "limit",
    ),
    "header_a_json_list": (None, lambda: raw_safetensors(b"[1, 2]", b""), "JSON object"),
    "header_not_json": (None, lambda: raw_safetensors(b"{not json", b""), "JSON"),
    "header_not_utf8": (None, lambda: raw_safetensors(b'{"\xff": 1}', b""), "UTF-8"),
    "header_repeated_key": (
        None,
        lambda: raw_safetensors(
            b'{"x": %s, "x": %s}' % ((json.dumps(_entry("F32", [0], 0, 0)).encode(),) * 2), b""
        ),
        "repeats",
    ),
    "overlapping_offsets": (
        None,
        lambda: _header(
            {"x": _entry("F32", [4], 0, 16), "y": _entry("F32", [4], 8, 24)}, bytes(24)
        ),
        "overlaps",
    ),
    "offsets_out_of_range": (
        None,
        lambda: _header({"x": _entry("F32", [4], 0, 16)}, bytes(8)),
        "outside",
    ),
    "offsets_not_matching_shape": (
        None,
        lambda: _header({"x": _entry("F32", [3], 0, 16)}, bytes(16)),
        "do not match",
    ),
    "gap_between_tensors": (
        None,
        lambda: _header(
            {"x": _entry("F32", [2], 0, 8), "y": _entry("F32", [2], 12, 20)}, bytes(20)
        ),
        "unused bytes",
    ),
    "trailing_bytes": (None, lambda: GOOD + b"\x00" * 4, "after the last tensor"),
    "negative_dim": (None, lambda: _header({"x": _entry("F32", [-1], 0, 0)}, b""), "shape"),
    "unknown_dtype": (
        None,
        lambda: _header({"x": _entry("Q4_K", [4], 0, 4)}, bytes(4)),
        "unknown dtype",
    ),
    "f64_dtype": (None, lambda: _header({"x": _entry("F64", [2], 0, 16)}, bytes(16)), "F64"),
    "int8_dtype": (None, lambda: _header({"x": _entry("I8", [4], 0, 4)}, bytes(4)), "I8"),
    "metadata_not_strings": (
        None,
        lambda: raw_safetensors(b'{"__metadata__": {"a": 1}}', b""),
        "__metadata__",
    ),
    "no_tensors": (None, lambda: raw_safetensors(b"{}", b""), "no LoRA weights"),
    "nan_value": (None, lambda: encode_safetensors(_poisoned(float("nan"))), "NaN"),
    "inf_value": (None, lambda: encode_safetensors(_poisoned(float("inf"))), "infinite"),
    "f16_minus_inf": (None, lambda: encode_safetensors(_poisoned(-np.inf, "F16")), "infinite"),
    "bf16_nan": (None, lambda: encode_safetensors(_bf16_nan()), "NaN"),
    # The hostile-tenant finding: finite, yet one request poisoned every tenant's K/V rows.
    "finite_3e38_in_lora_b": (
        None,
        lambda: encode_safetensors(_poisoned(3e38)),
        "lora_B of layers.0.q_proj: max |value| 3e+38 exceeds 10000",
    ),
    "delta_bound_exceeded": (
        None,
        lambda: encode_safetensors({k: v * 10 for k, v in lora_tensors().items()}),
        "delta bound scale x r x max|A| x max|B|",
    ),
    "unknown_module_name": (
        None,
        lambda: encode_safetensors(
            {k.replace("q_proj", "qkv_proj"): v for k, v in _q_only().items()}
        ),
        "unknown module self_attn.qkv_proj",
    ),
    "module_in_wrong_block": (
        None,
        lambda: encode_safetensors(
            {k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in _q_only().items()}
        ),
        "unknown module",
    ),
    "not_a_lora_tensor": (
        None,
        lambda: encode_safetensors({**_q_only(), "lm_head.weight": np.zeros((4, 4), np.float32)}),
        "does not name",
    ),
    "layer_past_the_model": (None, lambda: encode_safetensors(lora_tensors(layers=3)), "layers"),
    "module_not_in_target_modules": (
        lora_config(modules=("q_proj",)),
        lambda: GOOD,
        "not in target_modules",
    ),
    "lora_b_missing": (
        None,
        lambda: encode_safetensors({k: v for k, v in lora_tensors().items() if k != B}),
        "lora_B is missing",
    ),
    "wrong_shape_in_features": (
        None,
        lambda: encode_safetensors(_replace(A, np.zeros((4, 65), np.float32))),
        "expected [4, 64]",
    ),
    "wrong_shape_kv_out": (
        None,
        lambda: encode_safetensors(
            _replace(B.replace("q_proj", "v_proj"), np.zeros((64, 4), np.float32))
        ),
        "expected [32, 4]",
    ),
    "rank_differs_from_config": (None, lambda: encode_safetensors(lora_tensors(rank=8)), "shape"),
    "rank_over_the_limit": (
        lora_config(rank=17),
        lambda: encode_safetensors(lora_tensors(rank=17)),
        "exceeds the maximum rank 16",
    ),
    "pickle_file": (None, _pickle, "pickle"),
    "zip_file": (None, _zip, "zip"),
}

BAD_CONFIGS: dict[str, tuple[object, str]] = {
    "config_not_json": (b"{peft_type: LORA", "not valid JSON"),
    "config_not_an_object": (b"[1]", "not a JSON object"),
    "config_not_lora": (lora_config(peft_type="IA3"), "not a LoRA config"),
    "config_missing_peft_type": ({"r": 4}, "not a LoRA config"),
    "dora": (lora_config(use_dora=True), "DoRA"),
    "rank_pattern": (lora_config(rank_pattern={"q_proj": 8}), "rank_pattern"),
    "alpha_pattern": (lora_config(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
    "bias_all": (lora_config(bias="all"), "bias"),
    "modules_to_save": (lora_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "fan_in_fan_out": (lora_config(fan_in_fan_out=True), "fan_in_fan_out"),
    "unknown_target_module": (lora_config(modules=("q_proj", "lm_head")), "unknown target"),
    "target_modules_missing": (lora_config(target_modules=None), "target_modules"),
    "rank_zero": (lora_config(rank=0), "r must be"),
    "alpha_not_number": (lora_config(lora_alpha="8"), "lora_alpha"),
    "alpha_nan": (lora_config(lora_alpha=float("nan")), "lora_alpha"),
    "alpha_1e308": (lora_config(lora_alpha=1e308), "scale lora_alpha / r = 2.5e+307"),
    "alpha_int_past_float_range": (lora_config(lora_alpha=10**400), "lora_alpha must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
async def test_bad_model_file_is_refused_and_leaves_nothing(
    case: str, catalog: Catalog, tmp_path: Path, nothing_left
) -> None:
    config, model, words = BAD_MODELS[case]
    await catalog.create_tenant("acme")
    paths = write_adapter(tmp_path / "upload", config=config, model=model())
    with pytest.raises(ValidationFailed) as refused:
        await catalog.upload_version("acme", "support", *paths)
    assert words in refused.value.reason
    await nothing_left()


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
async def test_bad_config_is_refused_and_leaves_nothing(
    case: str, catalog: Catalog, tmp_path: Path, nothing_left
) -> None:
    config, words = BAD_CONFIGS[case]
    await catalog.create_tenant("acme")
    paths = write_adapter(tmp_path / "upload", config=config)
    with pytest.raises(ValidationFailed) as refused:
        await catalog.upload_version("acme", "support", *paths)
    assert words in refused.value.reason
    await nothing_left()


async def test_body_over_the_size_limit_is_too_large(
    catalog: Catalog, tmp_path: Path, nothing_left
) -> None:
    await catalog.create_tenant("acme")
    paths = write_adapter(tmp_path / "upload")
    catalog.max_adapter_bytes = paths[1].stat().st_size - 1
    with pytest.raises(TooLarge):
        await catalog.upload_version("acme", "support", *paths)
    await nothing_left()


async def test_a_refused_upload_keeps_earlier_versions_intact(
    catalog: Catalog, tmp_path: Path
) -> None:
    await catalog.create_tenant("acme")
    first = await catalog.upload_version("acme", "support", *write_adapter(tmp_path / "good"))
    bad = write_adapter(tmp_path / "bad", model=encode_safetensors(_poisoned(float("nan"))))
    with pytest.raises(ValidationFailed):
        await catalog.upload_version("acme", "support", *bad)
    assert await count_rows(catalog) == (1, 1)
    keys = {p.name for p in stored_objects(catalog.store)}  # type: ignore[arg-type]
    assert first.sha256 in keys and len(keys) == 2


@pytest.mark.parametrize(
    ("dtype", "modules", "declared"),
    [
        ("F32", ("q_proj", "v_proj"), ["v_proj", "q_proj"]),
        ("F16", ("q_proj", "k_proj", "v_proj", "o_proj"), r".*\.(q|k|v|o)_proj"),
        ("F32", ("gate_proj", "up_proj", "down_proj"), "all-linear"),
    ],
)
async def test_good_adapter_is_stored_with_its_facts(
    catalog: Catalog, tmp_path: Path, dtype: str, modules: tuple[str, ...], declared
) -> None:
    await catalog.create_tenant("acme")
    tensors = lora_tensors(modules=modules, dtype=dtype)
    model = encode_safetensors(tensors, metadata={"format": "pt"})
    config = lora_config(modules=declared)
    config_path, model_path = write_adapter(tmp_path / "up", config=config, model=model)
    view = await catalog.upload_version("acme", "support", config_path, model_path)
    assert view.version == 1 and view.active
    assert view.rank == 4 and view.alpha == 8.0
    assert list(view.target_modules) == list(modules)  # canonical order, as present
    assert view.size_bytes == len(model)
    assert view.sha256 == hashlib.sha256(model).hexdigest()
    config_sha = hashlib.sha256(config_path.read_bytes()).hexdigest()
    stored = sorted(
        str(p.relative_to(catalog.store.root))  # type: ignore[attr-defined]
        for p in stored_objects(catalog.store)  # type: ignore[arg-type]
    )
    expected = sorted(f"sha256/{s[:2]}/{s}" for s in (view.sha256, config_sha))
    assert stored == expected


async def test_a_failed_insert_removes_only_the_objects_it_created(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await catalog.create_tenant("acme")
    kept = await catalog.upload_version("acme", "a", *write_adapter(tmp_path / "one"))

    async def broken_insert(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr("adapters.versions.insert_version", broken_insert)
    # Same safetensors as version 1 (already stored, referenced) with a new config object.
    again = write_adapter(tmp_path / "two", config=lora_config(lora_dropout=0.1))
    with pytest.raises(RuntimeError):
        await catalog.upload_version("acme", "a", *again)
    fresh = write_adapter(tmp_path / "three", model=lora_tensors(seed=5))
    with pytest.raises(RuntimeError):
        await catalog.upload_version("acme", "b", *fresh)
    names = {p.name for p in stored_objects(catalog.store)}  # type: ignore[arg-type]
    assert len(names) == 2 and kept.sha256 in names  # version 1's model and config only
    assert await count_rows(catalog) == (1, 1)


async def test_a_store_failure_midway_removes_the_objects_already_put(
    catalog: Catalog, tmp_path: Path, nothing_left, monkeypatch: pytest.MonkeyPatch
) -> None:
    await catalog.create_tenant("acme")
    paths = write_adapter(tmp_path / "up")
    real_put = catalog.store.put_file
    config_sha = hashlib.sha256(paths[0].read_bytes()).hexdigest()

    def put_file(path: Path, sha: str) -> bool:
        if sha == config_sha:  # the model went in; the config does not
            raise StorageUnavailable("S3 put failed: SlowDown")
        return real_put(path, sha)

    monkeypatch.setattr(catalog.store, "put_file", put_file)
    with pytest.raises(StorageUnavailable):
        await catalog.upload_version("acme", "support", *paths)
    await nothing_left()
