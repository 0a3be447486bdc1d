"""The compressed-tensors export: transformers loads it, its logits are Sapling's fake-quantized model's, the
packed integers are exactly the quantized ones, incompatible layers fail or are left 16-bit, writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from sapling.quant import export as export_mod
from sapling.quant.apply import cast_parameters, cpu_float32, load_quantized
from sapling.quant.export import export_compressed, read_packed
from sapling.quant.layerwise import quantize_model
from sapling.quant.numerics import QuantSpec


def tiny_llama(intermediate: int = 128, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def calib(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (2, 16), generator=g) for _ in range(n)]


def reference_unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Independent bit-level unpacking: per row an LSB-first bit stream over the int32 words, values offset
    by 2**(bits-1) (compressed-tensors' pack-quantized layout)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows = words.shape[0]
    bit = torch.arange(32, dtype=torch.int64)
    stream = ((words[:, :, None] >> bit) & 1).reshape(rows, -1)  # [rows, 32 * words]
    fields = stream[:, : cols * bits].reshape(rows, cols, bits)
    unsigned = (fields << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return (unsigned - (1 << (bits - 1))).to(torch.int8)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, torch.bfloat16), QuantSpec(8, None, torch.bfloat16),
                                  QuantSpec(4, 64, torch.float16)], ids=lambda s: f"{s.label}-{s.scale_dtype}")
@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-mse"])
def test_transformers_loads_the_export_with_the_fake_quantized_logits(tmp_path, spec, method):
    model = tiny_llama()
    # RTN is asked for mse scales too: it keeps absmax ones, and the export must say minmax
    asked = "minmax" if method == "gptq" else "mse"
    observer = "mse" if method == "gptq-mse" else "minmax"
    result = quantize_model(model, spec, method=method.split("-")[0], batches=calib(), progress=False,
                            observer=asked)
    out = export_compressed(model, result, tmp_path / "export")

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == spec.bits and weights["symmetric"] is True
    assert weights["strategy"] == ("channel" if spec.group_size is None else "group")
    assert weights["observer"] == observer  # how the scales were chosen, as llm-compressor records it
    # GPTQ's activation order with static groups; RTN has none, and per-channel scales take no actorder
    assert weights.get("actorder") == ("static" if method != "rtn" and spec.group_size else None)
    assert "lm_head" in qcfg["ignore"]

    fake = cast_parameters(model, spec.scale_dtype)  # Sapling's fake-quantized model in the export dtype
    ids = torch.randint(0, 200, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = fake(ids).logits.float()
        served = AutoModelForCausalLM.from_pretrained(out)  # the compressed (serving-format) modules
        got_compressed = served(ids).logits.float()
        # decompressed on load; on CPU its parameters are the same values in float32, and so is the reference's
        got = load_quantized(out)(ids).logits.float()
        assert next(load_quantized(out).parameters()).dtype == torch.float32
        expected_fp32 = cpu_float32(fake)(ids).logits.float()
    # Tolerance: exact. The export stores the same integers and scales, and dequantization (q * scale in the
    # scale dtype) is the computation Sapling's fake quantization performs.
    torch.testing.assert_close(got_compressed, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, expected_fp32, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, torch.bfloat16), QuantSpec(8, None, torch.bfloat16)],
                         ids=lambda s: s.label)
def test_packing_round_trips_exactly(tmp_path, spec):
    model = tiny_llama(seed=3)
    result = quantize_model(model, spec, method="gptq", batches=calib(), progress=False)
    out = export_compressed(model, result, tmp_path / "export")
    stored = read_packed(out, spec.bits)
    assert set(stored) == set(result.weights)
    tensors = {}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            tensors[key] = f.get_tensor(key)
    for name, (q, scale) in result.weights.items():
        assert q.min() >= spec.qmin and q.max() <= spec.qmax
        assert torch.equal(stored[name][0], q)
        assert torch.equal(stored[name][1], scale)
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape[1] == q.shape[1] * spec.bits // 32
        assert torch.equal(reference_unpack(packed, spec.bits, q.shape[1]), q)
    # embeddings and lm_head stay 16-bit
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16


def test_incompatible_width_names_the_layer_or_is_left_16bit(tmp_path):
    spec = QuantSpec(4, 64, torch.bfloat16)
    model = tiny_llama(intermediate=96)  # down_proj's input width 96 is not a multiple of 64
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj has input width 96.*quant\.group_size=32"
                                         r".*quant\.skip_incompatible=true"):
        quantize_model(model, spec, method="rtn", progress=False)
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    result = quantize_model(model, spec, method="rtn", skip_incompatible=True, progress=False)
    assert result.skipped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)  # untouched
    out = export_compressed(model, result, tmp_path / "export")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert set(result.skipped) <= set(ignore)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.1.mlp.down_proj.weight" in keys  # stored plainly
        assert "model.layers.1.mlp.down_proj.weight_packed" not in keys
        stored = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(stored, before.to(torch.bfloat16))
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        reference = cpu_float32(cast_parameters(model, torch.bfloat16))  # the stored values, computed as loaded
        torch.testing.assert_close(load_quantized(out)(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_llama()
    result = quantize_model(model, QuantSpec(4, 32, torch.bfloat16), method="rtn", progress=False)
    previous = export_compressed(model, result, tmp_path / "export")
    before = sorted(p.name for p in previous.iterdir())

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated mismatch")

    monkeypatch.setattr(export_mod, "check_packed", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export_compressed(model, result, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == before  # the earlier export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dir left


def test_export_does_not_modify_the_model(tmp_path):
    model = tiny_llama()
    result = quantize_model(model, QuantSpec(4, 32, torch.bfloat16), method="rtn", progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_compressed(model, result, tmp_path / "export")
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(type(m) is not torch.nn.Linear or not hasattr(m, "weight_scale") for m in model.modules())


def test_single_process_hides_the_process_group_from_compressed_tensors_only(tmp_path):
    """Rank 0 exporting alone turns off compressed-tensors' collective paths, and nothing else: the process
    group stays visible to torch.distributed's other users (the old switch patched it away process-wide)."""
    import torch.distributed as dist
    from compressed_tensors.distributed import is_distributed

    from sapling.quant.apply import single_process

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert is_distributed()
        with single_process():
            assert dist.is_initialized() and dist.get_world_size() == 1
            assert not is_distributed()
        assert is_distributed() and dist.is_initialized()
    finally:
        dist.destroy_process_group()
