"""layerwise_bits: each block at one of two widths by ShortGPT's block influence, the widths (read back from the stored
bytes) average to the budget, importance orders the widths, each group stays on its grid, restore is bit-exact."""

import random

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.depth import block_influence
from bench.errors import ConfigError
from bench.methods.gptq import GPTQ
from bench.methods.layerwise_bits import LayerwiseBits, allocate_bits
from bench.methods.rtn import RTN
from bench.quant import unpack_bits
from conftest import loaded_tiny, random_calib

GROUP = 32


@pytest.fixture(scope="module")
def tiny4():
    return loaded_tiny("llama", layers=4)


def _stored_bits(packed, refs) -> dict[int, float]:
    """Code bits per weight of each block, from the bytes of its stored codes."""
    code_bytes, weights = {}, {}
    for r in refs:
        code_bytes[r.block] = code_bytes.get(r.block, 0) + packed.layers[r.name]["qweight"].numel()
        weights[r.block] = weights.get(r.block, 0) + r.module.weight.numel()
    return {b: 8 * code_bytes[b] / weights[b] for b in code_bytes}


def test_allocation_orders_by_importance_and_meets_reachable_budgets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 40)
        importance = [rng.random() for _ in range(n)]
        low, high = sorted(rng.sample(range(2, 9), 2))
        k = rng.randint(0, n)  # a budget reachable with k blocks at the low width
        avg = (k * low + (n - k) * high) / n
        bits = allocate_bits(importance, [7] * n, low, high, avg)
        assert sum(bits) / n == pytest.approx(avg, abs=1e-12) and bits.count(low) == k
        for i in range(n):
            for j in range(n):
                if importance[i] > importance[j]:
                    assert bits[i] >= bits[j]
    # an unreachable budget: the nearest average below it (one 4 -> 2 move would not reach 3.0 on 3 blocks)
    assert allocate_bits([0.3, 0.1, 0.2], [1, 1, 1], 2, 4, 3.0) == [4, 2, 2]
    # blocks of unequal size are weighted by their weight counts: 4*1 + 2*3 = 10 bits over 4 weights = 2.5
    assert allocate_bits([0.1, 0.9], [3, 1], 2, 4, 2.5) == [2, 4]


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_block_widths_average_to_the_budget_follow_importance_stay_on_grid_and_restore_exactly(
        quantizer, tiny4, tmp_path):
    method = LayerwiseBits(avg_bits=3.0, low_bits=2, high_bits=4, quantizer=quantizer, group_size=GROUP)
    calib = random_calib()
    work = models.clone(tiny4)
    packed = method.compress(work, calib, Budget(name="t"))
    refs = list(tiny4.adapter.linears())
    assert set(packed.layers) == {r.name for r in refs}

    # widths counted from the stored code bytes: two blocks at 2 bits, two at 4, average exactly the budget
    bits = _stored_bits(packed, refs)
    assert sorted(bits.values()) == [2.0, 2.0, 4.0, 4.0]
    assert sum(bits.values()) / len(bits) == 3.0 == packed.info["average_code_bits"]
    assert packed.info["blocks_at_low_bits"] == 2
    for r in refs:  # the stored width, the layer format and the per-layer record agree with the code bytes
        assert int(packed.layers[r.name]["w_bits"][0]) == packed.layer_format[r.name].bits == bits[r.block]
    rows = {row["layer"]: row for row in packed.per_layer}
    assert all(rows[r.name]["bits"] == bits[r.block] for r in refs)

    # the importance is ShortGPT's block influence of the unquantized model; no block outranks a wider one
    influence = block_influence(tiny4.adapter, calib.windows)
    assert [rows[r.name]["block_influence"] for r in refs] == [influence[r.block] for r in refs]
    for a in bits:
        for b in bits:
            if influence[a] > influence[b]:
                assert bits[a] >= bits[b]

    # every (row, group) of every weight takes at most 2^bits values, codes in range
    for r in work.adapter.linears():
        q, b = r.module.weight.data, int(bits[r.block])
        codes = unpack_bits(packed.layers[r.name]["qweight"], b, q.numel(), q.shape)
        assert int(codes.max()) <= 2**b - 1
        for c in range(0, q.shape[1], GROUP):
            for row in q[:, c:c + GROUP]:
                assert row.unique().numel() <= 2**b

    # the artifact restores the compressed model bit for bit
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny4), packed.metadata())
    restored = method.restore(models.clone(tiny4), *store.load("k"))
    for (ka, a), (kb, b) in zip(work.module.state_dict().items(), restored.model.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    assert torch.equal(work.module(ids).logits, restored.model(ids).logits)
    assert restored.layer_format == packed.layer_format


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_at_the_top_width_it_stores_exactly_what_the_uniform_quantizer_stores(quantizer, tiny4):
    """avg_bits = high_bits keeps every block at high_bits: the same codes, scales and zeros as rtn / gptq."""
    calib = random_calib()
    mixed = LayerwiseBits(avg_bits=4, low_bits=2, high_bits=4, quantizer=quantizer, group_size=GROUP)
    uniform = (RTN if quantizer == "rtn" else GPTQ)(bits=4, group_size=GROUP)
    a = mixed.compress(models.clone(tiny4), calib, Budget(name="t"))
    b = uniform.compress(models.clone(tiny4), calib, Budget(name="t"))
    for name, stored in b.layers.items():
        assert {k: v for k, v in a.layers[name].items() if k != "w_bits"}.keys() == stored.keys()
        for k, v in stored.items():
            assert torch.equal(a.layers[name][k], v), (name, k)


@pytest.mark.parametrize("settings, message", [
    ({"avg_bits": 4.5}, "method.avg_bits=4.5 is outside [low_bits, high_bits] = [2, 4]; set method.avg_bits between 2 "
                        "and 4, or change the widths"),
    ({"avg_bits": 1.5}, "method.avg_bits=1.5 is outside [low_bits, high_bits] = [2, 4]"),
    ({"low_bits": 4, "high_bits": 4, "avg_bits": 4},
     "method.low_bits=4 is not below method.high_bits=4; set two widths"),
    ({"high_bits": 9}, "method.high_bits=9 is out of range; use a value in [2, 8]"),
    ({"avg_bits": None}, "method.avg_bits=None is outside [low_bits, high_bits] = [2, 4]"),
    ({"quantizer": "awq"}, "method.quantizer='awq' is not one of rtn, gptq; set method.quantizer=rtn or"),
])
def test_a_bad_budget_or_width_raises_one_line_naming_the_fix(settings, message):
    with pytest.raises(ConfigError) as e:
        LayerwiseBits(**settings)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
