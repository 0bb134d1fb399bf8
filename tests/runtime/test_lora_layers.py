"""LoRA slot tables against PEFT's own modules: parsing, scales, slices, mixed slots, resets."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file, save

from runtime.lora.layers import LoraManager
from runtime.lora.peft import parse_peft_adapter
from runtime.lora.protocol import LORA_TARGETS, PROJECTIONS
from runtime.model.builtin import ensure_builtin_model
from runtime.model.weights import ModelArgs
from tests.support.lora_oracle import SPECS, load_peft_multi, make_peft_adapter

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora-layers")
    model_dir = ensure_builtin_model(root / "base")
    dirs = {s.name: root / s.name for s in SPECS}
    refs = {s.name: make_peft_adapter(model_dir, dirs[s.name], s) for s in SPECS}
    return model_dir, dirs, refs


def manager_for(model_dir: Path, num_slots: int, max_rank: int = 32) -> LoraManager:
    args = ModelArgs.from_model_dir(model_dir)
    return LoraManager.for_model(args, num_slots, max_rank, "cpu", torch.float32)


def read(ref) -> bytes:
    return Path(ref.uri.removeprefix("file://")).read_bytes()


def peft_module(peft_model, layer: int, module: str):
    block = peft_model.base_model.model.model.layers[layer]
    return getattr(block.mlp if module in ("gate_proj", "up_proj", "down_proj")
                   else block.self_attn, module)


def test_mixed_slots_match_peft_modules_in_every_layer_and_projection(adapters) -> None:
    model_dir, dirs, refs = adapters
    names = [s.name for s in SPECS]
    manager = manager_for(model_dir, num_slots=len(names) + 1)
    slot_of = {name: i + 1 for i, name in enumerate(names)}  # slot 0 stays empty
    for name in names:
        manager.set_lora(slot_of[name], manager.parse(read(refs[name]), refs[name]))
    peft_model = load_peft_multi(model_dir, dirs)
    gen = torch.Generator().manual_seed(0)
    token_adapter = [names[i % len(names)] if i % 4 else None for i in range(29)]
    token_to_slot = [slot_of[n] if n else -1 for n in token_adapter]
    manager.prepare(torch.tensor(token_to_slot, dtype=torch.int32))
    assert manager.active
    inverse = {}
    for module, (proj, j) in LORA_TARGETS.items():
        inverse.setdefault(proj, []).append((j, module))
    for layer in range(manager.shapes.num_layers):
        for proj in PROJECTIONS:
            x = torch.randn(len(token_adapter), manager.shapes.in_features[proj], generator=gen)
            y = torch.randn(len(token_adapter), sum(manager.shapes.slice_sizes[proj]),
                            generator=gen)
            expected = y.clone()
            offsets = [0]
            for size in manager.shapes.slice_sizes[proj]:
                offsets.append(offsets[-1] + size)
            with torch.no_grad():
                for j, module in sorted(inverse[proj]):
                    mod = peft_module(peft_model, layer, module)
                    for i, name in enumerate(token_adapter):
                        if name is None:
                            continue
                        peft_model.set_adapter(name)
                        delta = mod(x[i : i + 1]) - mod.base_layer(x[i : i + 1])
                        expected[i, offsets[j] : offsets[j + 1]] += delta[0]
                manager.apply(layer, proj, x, y)
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_scales_follow_alpha_over_rank_or_its_square_root(adapters) -> None:
    model_dir, _, refs = adapters
    manager = manager_for(model_dir, num_slots=2)
    plain, rs = refs["all-r8"], refs["rslora-r16"]
    manager.set_lora(0, manager.parse(read(plain), plain))
    manager.set_lora(1, manager.parse(read(rs), rs))
    assert manager.scales.tolist() == pytest.approx([16.0 / 8, 8.0 / 16**0.5])


def test_reusing_a_slot_leaves_nothing_of_the_previous_adapter(adapters) -> None:
    model_dir, _, refs = adapters
    manager = manager_for(model_dir, num_slots=1)
    wide, narrow = refs["mlp-r32"], refs["qv-r8"]
    manager.set_lora(0, manager.parse(read(wide), wide))
    assert manager.lora_b["down_proj"].abs().sum() > 0
    manager.set_lora(0, manager.parse(read(narrow), narrow))
    for proj in ("o_proj", "gate_up_proj", "down_proj"):
        assert manager.lora_a[proj].abs().sum() == 0 and manager.lora_b[proj].abs().sum() == 0
    assert manager.lora_a["qkv_proj"][:, 1].abs().sum() == 0  # k slice: not targeted
    assert manager.lora_a["qkv_proj"][:, 0, 0, 8:].abs().sum() == 0  # past rank 8
    manager.reset_lora(0)
    assert all(manager.lora_a[p].abs().sum() == 0 for p in PROJECTIONS)
    assert manager.scales.tolist() == [0.0]


def test_a_step_without_adapters_is_inactive_and_leaves_y_alone(adapters) -> None:
    model_dir, _, refs = adapters
    manager = manager_for(model_dir, num_slots=1)
    ref = refs["all-r8"]
    manager.set_lora(0, manager.parse(read(ref), ref))
    manager.prepare(torch.full((5,), -1, dtype=torch.int32))
    assert not manager.active and manager.meta is None
    y = torch.ones(5, 128)
    manager.apply(0, "o_proj", torch.randn(5, 128), y)
    assert torch.equal(y, torch.ones(5, 128))
    manager.prepare(torch.empty(0, dtype=torch.int32))
    assert not manager.active


def test_parse_refuses_what_does_not_fit(adapters) -> None:
    model_dir, _, refs = adapters
    args = ModelArgs.from_model_dir(model_dir)
    manager = manager_for(model_dir, num_slots=1, max_rank=16)
    ref = refs["attn-r4"]
    data = read(ref)
    tensors = load_file(ref.uri.removeprefix("file://"))

    def refused(raw: bytes, match: str, r=ref, mgr=manager) -> None:
        with pytest.raises(ValueError, match=match):
            mgr.parse(raw, r)

    only_q = msgspec.structs.replace(ref, target_modules=("q_proj",))
    refused(data, "not in the adapter's modules", only_q)
    refused(data, "do not fit rank 8", msgspec.structs.replace(ref, rank=8))
    refused(read(refs["mlp-r32"]), "outside 1..16", refs["mlp-r32"])
    refused(b"garbage", "not a readable safetensors")
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}
    refused(save(renamed), "unsupported tensor")
    broken = dict(tensors)
    first = next(k for k in broken if "lora_A" in k)
    broken[first] = broken[first].clone()
    broken[first][0, 0] = float("nan")
    refused(save(broken), "non-finite")
    half = {k: v for k, v in tensors.items() if "lora_B" not in k}
    refused(save(half), "must come together")
    assert args.num_layers == 4  # the built-in model the shapes above were made for
    weights = parse_peft_adapter(data, ref, manager.shapes, 16, torch.float16)
    assert sorted(weights.a) == ["o_proj", "qkv_proj"]  # attention only
    qkv_a = weights.a["qkv_proj"]
    assert qkv_a.shape == (4, 3, 4, 128) and qkv_a.dtype == torch.float16
    # k and v are narrower than q under GQA: their B rows past kv_size stay zero.
    kv = args.num_kv_heads * args.head_dim
    assert weights.b["qkv_proj"][:, 1:, kv:].abs().sum() == 0


def test_dense_form_matches_the_segment_path_and_follows_slot_writes(adapters) -> None:
    import kernels

    model_dir, _, refs = adapters
    manager = manager_for(model_dir, num_slots=4)
    for slot, name in ((0, "attn-r4"), (2, "all-r8")):
        manager.set_lora(slot, manager.parse(read(refs[name]), refs[name]))
    gen = torch.Generator().manual_seed(1)

    def check_step(token_to_slot: list[int]) -> None:
        for layer in range(manager.shapes.num_layers):
            for proj in PROJECTIONS:
                x = torch.randn(len(token_to_slot), manager.shapes.in_features[proj],
                                generator=gen)
                y = torch.randn(len(token_to_slot), sum(manager.shapes.slice_sizes[proj]),
                                generator=gen)
                want = y.clone()
                sizes = list(manager.shapes.slice_sizes[proj])
                kernels.add_lora(want, x, manager.lora_a[proj][layer],
                                 manager.lora_b[proj][layer], manager.scales, manager.meta,
                                 sizes)
                manager.apply(layer, proj, x, y)
                torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5,
                                           msg=f"layer {layer} {proj}")
                base = torch.tensor(token_to_slot) < 0
                assert torch.equal(y[base], want[base])  # base-model rows untouched

    decode = [0, -1, 2, 0, 2, -1, 0, 2, 2, -1]  # a decode step: one token per request
    manager.prepare(torch.tensor(decode, dtype=torch.int32))
    assert manager.dense_projections == frozenset(PROJECTIONS)
    check_step(decode)
    # A new adapter in an active slot: the next step packs its weights, not the old ones.
    manager.set_lora(2, manager.parse(read(refs["mlp-r32"]), refs["mlp-r32"]))
    manager.prepare(torch.tensor(decode, dtype=torch.int32))
    check_step(decode)
    # Each projection packs only the adapters targeting it, at their own rank: attention
    # carries attn-r4 alone (4 columns a slice), not padded to mlp-r32's 32 beside it.
    assert manager._pack("o_proj")[0].shape[1] == 4
    assert manager._pack("qkv_proj")[0].shape[1] == 3 * 4
    assert manager._pack("down_proj")[0].shape[1] == 32
    # A long prefill with one adapter token: padding every token would waste far more than
    # the loop's few calls, so the segment path runs.
    prefill = [-1] * 4000 + [0]
    manager.prepare(torch.tensor(prefill, dtype=torch.int32))
    assert manager.dense_projections == frozenset()
