"""fp32 islands inside a bf16 run (`bench.precision.compute("bf16")`): the numerics methods keep in fp32 (Hessians,
Cholesky factors, GPTQ sweeps, scale/clip searches, activation statistics, losses and backward) give fp32
results, equal to the fp32 path's where their inputs are the same, and training under autocast keeps fp32
master weights. fp32 runs are unchanged by the islands (fp32() is a no-op without autocast): the existing method
tests cover that."""

from __future__ import annotations

import math

import torch

from bench import models
from bench.budget import Budget
from bench.precision import compute, fp32
from conftest import random_calib

BF16 = "bf16"


def _inputs(n: int = 3, seqlen: int = 16, cols: int = 32, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, seqlen, cols, generator=g).to(dtype) for _ in range(n)]


def test_hessian_accumulator_is_fp32_inside_bf16():
    from bench.compress.hessian import HessianAccumulator

    xs = _inputs()
    ref, inside = HessianAccumulator(32), HessianAccumulator(32)
    for x in xs:
        ref.add(x)
    with compute(BF16):
        for x in xs:
            inside.add(x)
        bare = xs[0][0].T @ xs[0][0]  # what the accumulation would be without the island
    assert bare.dtype == torch.bfloat16  # the region really is bf16 autocast
    assert inside.H.dtype == torch.float32 and torch.equal(inside.H, ref.H)

    # bf16 inputs (o_proj's and down_proj's under autocast): upcast, accumulated in fp32
    xb = _inputs(dtype=torch.bfloat16)
    ref_b, inside_b = HessianAccumulator(32), HessianAccumulator(32)
    for x in xb:
        ref_b.add(x.float())
    with compute(BF16):
        for x in xb:
            inside_b.add(x)
    assert inside_b.H.dtype == torch.float32 and torch.equal(inside_b.H, ref_b.H)


def test_gptq_layer_math_is_identical_inside_bf16():
    """Same fp32 W and H in, the same codes, scales, weights and loss out: dampening, Cholesky, the sweep."""
    from bench.compress.gptq import gptq_quantize

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    H = 2 / 256 * x.T @ x
    ref = gptq_quantize(w, H, bits=3, group_size=16, act_order=True, block_size=16)
    with compute(BF16):
        got = gptq_quantize(w, H, bits=3, group_size=16, act_order=True, block_size=16)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
    assert torch.equal(got.dequantized, ref.dequantized) and got.loss == ref.loss


def test_block_caches_and_hessians_are_fp32_inside_bf16(tiny_llama):
    from bench.compress.hessian import block_hessians

    adapter = tiny_llama.adapter
    windows = random_calib(2, 24).windows
    with compute(BF16):
        inputs = adapter.capture_block_inputs(list(windows))
        outs, feats = adapter.run_block_capturing(0, inputs)
        _, hessians = block_hessians(adapter, inputs, 0)
    assert all(h.dtype == torch.float32 for h in inputs.hidden + outs)
    assert set(feats) >= {"o", "down"} and all(f.dtype == torch.float32 for f in feats.values())
    for name, H in hessians.items():
        assert H.dtype == torch.float32 and torch.isfinite(H).all(), name
        assert torch.allclose(H, H.T, rtol=0, atol=1e-5 * float(H.abs().max()))


def test_gptq_compress_inside_bf16_gives_fp32_grid_weights(tiny_llama):
    from bench.methods.gptq import GPTQ

    work = models.clone(tiny_llama)
    bits, g = 3, 32
    with compute(BF16):
        packed = GPTQ(bits=bits, group_size=g).compress(work, random_calib(4, 32), Budget(name="t"))
    assert packed.layers and all(math.isfinite(row["gptq_loss"]) for row in packed.per_layer)
    for ref in work.adapter.linears():
        w = ref.module.weight
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
        for c in range(0, w.shape[1], g):
            for row in w[:, c:c + g]:
                assert row.unique().numel() <= 2**bits, ref.name


def test_awq_searches_are_fp32_inside_bf16():
    from bench.methods.awq import AWQ, _output_error

    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(2, 40, 64, generator=g)
    method = AWQ(bits=3, group_size=16)
    ref_clip = method.clip_limits(lin.weight.data, x.reshape(-1, 64))
    with compute(BF16):
        got_clip = method.clip_limits(lin.weight.data, x.reshape(-1, 64))
        err = _output_error(lin, [lin], x.bfloat16(), {})  # a bf16 input, as o_proj's may be
    ref_err = _output_error(lin, [lin], x.bfloat16().float(), {})
    assert torch.equal(got_clip, ref_clip)
    with torch.no_grad():
        lin.weight.add_(0.01)
    assert err() > 0 and math.isclose(err(), ref_err(), rel_tol=1e-12)


def test_llm_fp4_and_fp_lowbit_searches_match_fp32_inside_bf16():
    from bench.methods.fp_lowbit import output_error
    from bench.methods.llm_fp4 import LLMFP4

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(8, 32, generator=g), torch.randn(64, 32, generator=g)
    method = LLMFP4(grid=8)
    ref = method.search_layer(w, x)
    h = x.T @ x
    with compute(BF16):
        got = method.search_layer(w, x)
        err = output_error(w * 0.01, h)
    assert got[0] == ref[0] and torch.equal(got[1], ref[1])
    assert got[2].e == ref[2].e and torch.equal(got[2].t, ref[2].t) and torch.equal(got[2].shift, ref[2].shift)
    assert err.dtype == torch.float32 and torch.equal(err, output_error(w * 0.01, h))


def test_activation_quantizers_compute_in_fp32_and_return_the_input_dtype():
    from bench.compress.static_ptq import fake_quant_static
    from bench.methods.xnor import binarize_tokens
    from bench.quant.floating import fake_quant_float_bias

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * 3
    xb = x.bfloat16()
    s, z = torch.tensor(0.05, dtype=torch.float16), torch.tensor(128.0)
    for f in (lambda t: fake_quant_static(t, s, z, 8), binarize_tokens, lambda t: fake_quant_float_bias(t, 2, 1, 1.5)):
        with compute(BF16):
            got = f(xb)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, f(xb.float()).bfloat16())  # the fp32 computation, cast back


def _check_trained(packed, budget):
    losses = [v for s in packed.training.stages for v in s.losses]
    assert len(losses) == budget.steps() and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in packed.model.parameters())


def test_onebit_distillation_inside_bf16_keeps_fp32_parameters(tiny_llama):
    from bench.methods.onebit import OneBit, OneBitLinear

    budget = Budget(name="t", train_steps=3, lr=5e-3, calib_samples=4, calib_seqlen=32, warmup_ratio=0.0)
    work = models.clone(tiny_llama)
    seen = []
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **kw):  # the update runs outside autocast, on fp32 master weights and fp32 grads
        seen.append((torch.is_autocast_enabled("cpu"), {p.grad.dtype for grp in self.param_groups
                                                        for p in grp["params"] if p.grad is not None}))
        return orig_step(self, *a, **kw)

    torch.optim.AdamW.step = step
    try:
        with compute(BF16):
            packed = OneBit().compress(work, random_calib(4, 32), budget)
    finally:
        torch.optim.AdamW.step = orig_step
    _check_trained(packed, budget)
    assert seen == [(False, {torch.float32})] * budget.steps()
    assert all(isinstance(r.module, OneBitLinear) for r in models.adapter_for(packed.model).linears())


def test_binarymos_distillation_inside_bf16(tiny_llama):
    from bench.methods.binarymos import BinaryMoS

    budget = Budget(name="t", train_steps=2, lr=5e-3, calib_samples=4, calib_seqlen=32, warmup_ratio=0.0)
    with compute(BF16):
        packed = BinaryMoS(n_experts=2).compress(models.clone(tiny_llama), random_calib(4, 32), budget)
    _check_trained(packed, budget)


def test_abq_block_training_inside_bf16(tiny_llama):
    from bench.methods.abq import ABQ

    budget = Budget(name="t", train_steps=2, lr=5e-3, calib_samples=2, calib_seqlen=24, warmup_ratio=0.0)
    work = models.clone(tiny_llama)
    with compute(BF16):
        packed = ABQ(bits=3, act_bits=8).compress(work, random_calib(2, 24), budget)
    assert len(packed.training.stages) == 2 and all(math.isfinite(s.loss_last) for s in packed.training.stages)
    for ref in work.adapter.linears():  # an 8-level grid per output row (per channel)
        w = ref.module.weight
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
        assert max(row.unique().numel() for row in w) <= 8


def test_fp32_islands_are_no_ops_outside_autocast():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with fp32():
        inside = a @ b
    assert torch.equal(inside, a @ b) and fp32(lambda: torch.is_autocast_enabled("cpu"))() is False
