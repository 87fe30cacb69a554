"""nupes: codes and dequantized weights take at most 2^bits values per group and lie on the power grid of the stored
exponent, exponent 1 is rtn bit for bit, the searched exponent is never worse than the uniform grid (and better on
bell-shaped weights), bits per weight counted from the stored tensors, exact reload, one-line config errors."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import ConfigError
from bench.hardware.cpu_kernels import format_reason
from bench.hardware.fpga_sim import layer_bits
from bench.hardware.tflite import layer_reason
from bench.methods.nupes import NUPES, quantize_power, search_exponent, signed_power
from bench.methods.rtn import RTN
from bench.quant import quantize_rtn


def _bell_shaped(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Laplace-distributed weights with per-row spread: the heavy-tailed shape of LLM weights."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) * (0.5 + torch.rand(rows, 1, generator=g)) * 0.02


@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, True), (2, False)])
def test_codes_and_levels_are_at_most_2_pow_bits_per_group_on_the_power_grid(bits, symmetric):
    w, g = _bell_shaped(), 64
    q, _ = search_exponent(w, bits, g, symmetric, 0.2, 1.0, 17, 10)
    a = q.exponent
    assert 0.2 <= a < 1.0  # heavy tails: a non-uniform grid is chosen
    deq = q.dequantize()
    codes = q.grid.codes.long()
    assert codes.max() < 2**bits
    s = q.grid.scale.float()
    z = torch.full_like(s, 2 ** (bits - 1)) if symmetric else q.grid.zero.float()
    levels_code = torch.arange(2**bits, dtype=torch.float32)
    levels = q.levels()
    for r in range(0, w.shape[0], 5):
        for gi in range(w.shape[1] // g):
            cols = slice(gi * g, (gi + 1) * g)
            assert codes[r, cols].unique().numel() <= 2**bits
            values = deq[r, cols].unique()
            assert values.numel() <= 2**bits
            # the group's grid: uniform levels (c - z) s over t, mapped back by the inverse power of the stored a
            grid = signed_power((levels_code - z[r, gi]) * s[r, gi], 1.0 / a)
            assert set(values.tolist()) <= set(levels[r, gi].tolist())
            torch.testing.assert_close(levels[r, gi], grid, rtol=1e-6, atol=0)  # pow: within rounding of the lookup
            steps = grid.diff()
            assert steps.max() > 1.1 * steps.min()  # not equally spaced: denser near zero
    torch.testing.assert_close(deq, signed_power(q.grid.dequantize(), 1.0 / a), rtol=1e-6, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_exponent_one_is_rtn_with_the_same_grid_exactly(symmetric):
    w = _bell_shaped(seed=3)
    p = quantize_power(w, 3, 32, symmetric, 1.0)
    r = quantize_rtn(w, 3, 32, symmetric)
    assert torch.equal(p.grid.codes, r.codes) and torch.equal(p.grid.scale, r.scale)
    assert torch.equal(p.dequantize(), r.dequantize())


def test_exponent_fixed_at_one_compresses_the_model_as_rtn(tiny_llama):
    a = NUPES(bits=3, group_size=32, exponent_min=1.0, exponent_max=1.0).compress(models.clone(tiny_llama), None,
                                                                                  Budget(name="t"))
    b = RTN(bits=3, group_size=32).compress(models.clone(tiny_llama), None, Budget(name="t"))
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    for layer, stored in a.layers.items():
        assert torch.equal(stored["qweight"], b.layers[layer]["qweight"])
    assert a.info["uniform_layers"] == len(a.layers)


def test_searched_exponent_is_never_worse_than_uniform_on_real_layers(default_model):
    """Block 0 and block 15 linears of the default model (real weights), W3 g128."""
    refs = [r for r in default_model.adapter.linears() if r.block in (0, 15)]
    gains = []
    for ref in refs:
        w = ref.module.weight.data
        q, errors = search_exponent(w, 3, 128, False, 0.2, 1.0, 9, 6, ref.name)
        err = float((q.dequantize() - w.float()).pow(2).sum())
        assert err == errors[q.exponent] <= errors[1.0]
        uniform = float((quantize_rtn(w, 3, 128).dequantize() - w.float()).pow(2).sum())
        assert errors[1.0] == uniform  # the uniform candidate is rtn's grid
        gains.append(1 - err / uniform)
    assert max(gains) > 0.05  # on some real layer the power grid removes over 5% of rtn's squared error


def test_bits_per_weight_counted_from_stored_tensors_and_exact_reload(tiny_llama, tmp_path):
    method = NUPES(bits=3, group_size=32, grid_points=5, refine_steps=3)
    work = models.clone(tiny_llama)
    packed = method.compress(work, None, Budget(name="t"))
    rep = packed.storage(tiny_llama)
    shapes = [r.module.weight.shape for r in tiny_llama.adapter.linears()]
    expected = sum(math.ceil(o * i * 3 / 8) + 2 * o * math.ceil(i / 32) + math.ceil(o * math.ceil(i / 32) * 3 / 8) + 2
                   for o, i in shapes)  # 3-bit codes + fp16 scale + 3-bit zero per group + one fp16 exponent per layer
    assert rep.linear_bytes == expected
    n = sum(o * i for o, i in shapes)
    assert rep.bits_per_weight == pytest.approx(3 + (16 + 3) / 32 + 16 * len(shapes) / n, abs=1e-12)
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    for (name, x), y in zip(work.module.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert restored.layer_format == packed.layer_format
    stats = {s["layer"]: s for s in packed.per_layer}
    for layer, stored in packed.layers.items():
        assert stored["exponent"].dtype == torch.float16 and float(stored["exponent"]) == stats[layer]["exponent"]
        assert stats[layer]["sq_error"] <= stats[layer]["sq_error_uniform"]


def test_layer_format_is_a_power_grid_the_integer_backends_refuse():
    fmt = NUPES(bits=3, group_size=128).layer_format()
    assert (fmt.kind, fmt.bits, fmt.group, fmt.symmetric, str(fmt)) == ("power", 3, 128, False, "nupes-pow3-asym-g128")
    assert "power-function grid" in format_reason(fmt)
    assert "not an integer grid" in layer_bits(fmt, 8)
    assert "not an integer grid" in layer_reason(fmt, "dynamic_int8")


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 9}, r"method.bits=9 is out of range"),
    ({"bits": 1}, r"method.bits=1 is out of range"),
    ({"exponent_min": 0.0}, r"exponent range .* is not a range around 1; use 0 < method.exponent_min <= 1"),
    ({"exponent_max": 0.8}, r"exponent range .* is not a range around 1"),
    ({"exponent_min": 1.2, "exponent_max": 2.0}, r"exponent range"),
    ({"exponent_max": 5.0}, r"method.exponent_max <= 4"),
    ({"grid_points": 1}, r"method.grid_points=1 is out of range"),
])
def test_bad_config_raises_one_line_naming_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        NUPES(**kwargs)
    assert "\n" not in str(e.value)


def test_conv_layers_of_rlfn_s_quantize_per_channel_and_reload(tmp_path):
    from bench.data import data_root

    root = data_root()
    if root is None or not (root / "sr_checkpoints/rlfn_bytedance/rlfn_s_x4.pth").is_file():
        pytest.skip("RLFN-S checkpoint not under the data root")
    base = models.load(models.ModelSpec(name="rlfn_s", source="sr_checkpoint", arch="rlfn_s"))
    method = NUPES(bits=4, group_size=-1, grid_points=5, refine_steps=3)
    packed = method.compress(models.clone(base), None, Budget(name="t"))
    assert packed.layers and all(s["sq_error"] <= s["sq_error_uniform"] for s in packed.per_layer)
    for ref in base.adapter.linears():
        w = packed.model.get_submodule(ref.name).weight.reshape(ref.module.weight.shape[0], -1)
        assert all(row.unique().numel() <= 16 for row in w)  # one grid per output channel: at most 2^4 values
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(base), packed.metadata())
    restored = method.restore(models.clone(base), *store.load("k"))
    for (name, x), y in zip(packed.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(x, y), name
