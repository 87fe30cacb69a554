"""bitmod: four datatypes of exactly 2^bits values, per-group choice never worse than plain FP, exact reload."""

import math

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.methods.bitmod import DATATYPES, BitMoD, datatype_values, quantize_bitmod


def test_datatypes_are_fp_values_plus_one_special():
    fp4 = [0, 1, 2, 3, 4, 6, 8, 12]
    plain = sorted({s * v for v in fp4 for s in (1, -1)})
    for name, special in zip(DATATYPES, (10, -10, 16, -16)):
        values = datatype_values(4, name).tolist()
        assert len(values) == 16 and sorted(set(values) - set(plain)) == [special]
    assert datatype_values(3, "er_pos").tolist() == [-4, -2, -1, 0, 1, 2, 3, 4]
    assert datatype_values(3, "ea_neg").tolist() == [-6, -4, -2, -1, 0, 1, 2, 4]


def test_each_group_uses_one_datatype_and_beats_plain_fp4():
    w = torch.randn(64, 320) * torch.rand(64, 1)
    codes, scales, selectors, deq = quantize_bitmod(w, 4, 64)
    assert codes.max() <= 15 and selectors.max() <= 3
    for r in range(0, 64, 7):
        for gi in range(5):
            vals = datatype_values(4, DATATYPES[selectors[r, gi]]) * scales[r, gi].float()
            group = deq[r, gi * 64:(gi + 1) * 64]
            assert set(group.tolist()) <= set(vals.tolist())
    # plain FP4 (E2M1, no special value) on the same absmax scale: the mixture is never worse per group
    plain = torch.tensor(sorted({s * v for v in [0, 1, 2, 3, 4, 6, 8, 12] for s in (1, -1)}))
    g = w.reshape(64, 5, 64)
    s = (g.abs().amax(-1, keepdim=True) / 12).half().float()
    idx = torch.searchsorted((plain[1:] + plain[:-1]) / 2, (g / s).contiguous())
    err_plain = (plain[idx] * s - g).pow(2).sum(-1)
    err_mix = (deq.reshape(64, 5, 64) - g).pow(2).sum(-1)
    assert torch.all(err_mix <= err_plain + 1e-9) and err_mix.sum() < err_plain.sum()


def test_bitmod_bits_per_weight_and_exact_reload(tiny_llama, tmp_path):
    method = BitMoD(bits=3, group_size=32)
    work = models.clone(tiny_llama)
    packed = method.compress(work, None, Budget(name="t"))
    rep = packed.storage(tiny_llama)
    shapes = [r.module.weight.shape for r in tiny_llama.adapter.linears()]
    expected = sum(math.ceil(o * i * 3 / 8) + 2 * o * math.ceil(i / 32) + math.ceil(o * math.ceil(i / 32) * 2 / 8)
                   for o, i in shapes)
    assert rep.linear_bytes == expected  # 3-bit codes + fp16 scale + 2-bit selector per group
    assert abs(rep.bits_per_weight - (3 + 18 / 32)) < 1e-9
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    for a, b in zip(work.module.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)
