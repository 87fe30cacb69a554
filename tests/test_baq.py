"""baq: the equal-loss bit allocation meets its budget, follows sensitivity, and beats uniform bits."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.gptq import gptq_quantize
from bench.compress.hessian import HessianAccumulator, inverse_hessian_factor
from bench.errors import BenchError
from bench.methods.baq import BAQ, Sensitivity, allocate, row_grid
from conftest import logits, random_calib


def test_allocation_meets_the_average_and_equalises_the_loss():
    g = torch.Generator().manual_seed(0)
    sens = [Sensitivity(rows, torch.randn(cols, generator=g) * 3) for rows, cols in ((64, 100), (32, 300))]
    bits = allocate(sens, 3.0, 8)
    total = sum(s.rows * s.log2_a.numel() for s in sens)
    avg = sum(float(r.sum()) * s.rows for r, s in zip(bits, sens)) / total
    assert 2.95 <= avg <= 3.0
    for r, s in zip(bits, sens):
        order = torch.argsort(s.log2_a)
        assert torch.all(r[order][1:] >= r[order][:-1])  # more sensitive columns never get fewer bits
    # unclamped columns: the relative loss A 2^-2R is equal up to the rounding of R (+-1/2 bit)
    losses = torch.cat([s.log2_a[(r > 0) & (r < 8)] - 2 * r[(r > 0) & (r < 8)] for r, s in zip(bits, sens)])
    assert losses.numel() > 100 and float(losses.max() - losses.min()) <= 2.0 + 1e-6


def _layer_with_uneven_inputs(seed=0, n=2048, d=128, out=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(d, generator=g))  # channels of very unequal scale
    w = torch.randn(out, d, generator=g) * 0.05
    acc = HessianAccumulator(d)
    acc.add(x)
    return w, x, acc.H


def test_baq_at_3_bits_average_beats_uniform_3_bit_gptq_on_the_layer_output():
    w, x, H = _layer_with_uneven_inputs()
    method = BAQ(bits=3.0)
    W = w.clone()
    d = torch.diag(inverse_hessian_factor(H, 0.01))
    a = (W.amax(dim=1).clamp(min=0) - W.amin(dim=1).clamp(max=0)).pow(2).sum() / (12 * d.pow(2))
    sens = Sensitivity(W.shape[0], torch.log2(a))
    col_bits = allocate([sens], 3.0, 8)[0]
    assert float(col_bits.mean()) <= 3.0 and col_bits.unique().numel() >= 3
    stored, deq, _ = method._quantize_layer(W, H, col_bits, "layer")
    scale, zero = row_grid(stored["row_min"], stored["row_max"], col_bits)
    codes = deq / scale + zero  # every weight is an integer code of its column's R_j-bit grid
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert torch.all(codes.round() >= 0) and torch.all(codes.round() <= 2 ** col_bits - 1)
    uniform = gptq_quantize(w, H, 3, -1).dequantized  # per-row min/max grid, every column 3 bits
    err_baq = (x @ (deq - w).T).pow(2).mean()
    err_uni = (x @ (uniform - w).T).pow(2).mean()
    assert err_baq < 0.7 * err_uni, (float(err_baq), float(err_uni))


def test_baq_on_a_model_meets_the_budget_and_restores_bit_exactly(tiny_llama, tmp_path):
    method = BAQ(bits=2.5, scope="model")
    work = models.clone(tiny_llama)
    packed = method.compress(work, random_calib(), Budget(name="t"))
    assert 2.4 <= packed.info["average_code_bits"] <= 2.5
    refs = list(tiny_llama.adapter.linears())
    means = [p["mean_code_bits"] for p in packed.per_layer]
    assert max(means) - min(means) > 0.2  # bits move between layers, not only between columns
    expected = 0
    for r in refs:
        o, i = r.module.weight.shape
        cb = packed.layers[r.name]["col_bits"].long()
        expected += i + 4 * o + sum(math.ceil(o * int((cb == b).sum()) * b / 8) for b in range(1, 9))
    assert packed.storage(tiny_llama).linear_bytes == expected
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    ids = torch.randint(0, 256, (1, 20))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))


def test_baq_layer_scope_gives_every_layer_the_average(tiny_llama):
    packed = BAQ(bits=3.0).compress(models.clone(tiny_llama), random_calib(), Budget(name="t"))
    for p in packed.per_layer:
        assert 2.9 <= p["mean_code_bits"] <= 3.0


def test_baq_rejects_bad_settings():
    with pytest.raises(BenchError, match="method.bits"):
        BAQ(bits=9.0)
    with pytest.raises(BenchError, match="method.scope"):
        BAQ(scope="group")
