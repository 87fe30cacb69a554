"""`qfx`: QFX, "QFX: Trainable Fixed-Point Quantization for Deep Learning Acceleration on FPGAs" (Dingyi Dai, Yichi
Zhang, Jiahao Zhang, Zhanqiu Hu, Yaohui Cai, Qi Sun, Zhiru Zhang; arXiv 2401.17544, 2024). Reference code: none is
public (the paper: "We plan to release QFX in open-source format"; searched here by repository name "qfx", the
cornell-zhang organisation and the code corpus); written from the paper's description.

Every tensor the FPGA datapath holds is a signed fixed-point number ap_fixed<W,I>: W bits, I of them integer bits
(sign included), F = W - I fraction bits. QFX fixes W and learns the binary-point position F of each tensor by
quantization-aware training, so that the trained model deploys through HLS with the same numbers as in software.
Here the tensors are the classifier's input and, for every conv/linear layer, its weights, its bias and its output
(the ReLU and max-pool that follow an output keep its type: both commute with the cast). The cast is the paper's
cast(x, W, F) = overflow(round(x << F), W) >> F with round-half-to-even and saturation (HLS AP_RND_CONV, AP_SAT):
`fixed_cast`. Accumulation is exact (hls4ml's `auto` accumulator; float64 here, exact for W <= 8 operands).

Gradient estimator (the paper's method section was not available offline, only its abstract and summaries, so this
is our reading of "learns the binary-point position during training" in a differentiable emulation): each tensor
has a real parameter f; the forward uses F = round(f) and the step 2^-F; rounding of values and of f pass the
gradient straight through, so f receives LSQ's step gradient (Esser et al. 2020) chained through d2^-f/df =
-ln2 2^-f, scaled by LSQ's 1/sqrt(N Qp). f starts at the F of least squared cast error on the trained model's own
weights and activations. Weights and biases train with Adam at `lr`, binary points at `point_lr`, cross-entropy on
the model's own training split (the 80% its recipe trained on; never the held-out images).

Deviations: W is one width for every tensor (the paper also sweeps mixed widths); the K-hot multiplier-free
variant is not included; training data is the model's training split, not a `calib=` set (there is no digits
calibration source). Stored: packed W-bit two's-complement codes of weights and biases and the learned F of each
tensor (int8). Execution: emulated fixed point - float64 torch ops on values that are exactly the fixed-point
numbers, so the fake-quant model equals the hls4ml C simulation at the declared types (`bench_fixed_point`, read by
hardware/fpga_sim.py) bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bench.errors import ConfigError, NotApplicable, check_range
from bench.image_sets import heldout_split, load_images
from bench.layer_format import ActFormat, LayerFormat
from bench.packed import EXECUTION_EMULATED_PREFIX, Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant.bitpack import pack_bits, unpack_bits
from bench.quant.integer import round_ste, scale_grad
from bench.training import Trainer, TrainingRecord

ROUNDING = "AP_RND_CONV,AP_SAT"  # round half to even (torch.round), saturate: what fixed_cast computes


def code_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fixed_cast(x: torch.Tensor, frac: int, bits: int) -> torch.Tensor:
    """x on the ap_fixed<bits, bits - frac, AP_RND_CONV, AP_SAT> grid (exact: scaling by 2^frac is exact)."""
    lo, hi = code_range(bits)
    return torch.clamp(torch.round(x * 2.0**frac), lo, hi) / 2.0**frac


def ap_fixed(bits: int, frac: int, rounding: bool = False) -> str:
    return f"ap_fixed<{bits},{bits - frac}" + (f",{ROUNDING}>" if rounding else ">")


def best_frac(x: torch.Tensor, bits: int) -> int:
    """The fraction bits of least squared cast error for the values x: from the F that holds max|x| without
    saturation to 8 finer (finer grids saturate the largest values)."""
    amax = float(x.abs().max().clamp(min=1e-12))
    start = bits - 1 - math.ceil(math.log2(amax))
    return min(range(start, start + 9), key=lambda f: float((fixed_cast(x, f, bits) - x).square().sum()))


class BinaryPoint(nn.Module):
    """One tensor's learned binary point: the forward casts with F = round(f) fraction bits."""

    def __init__(self, bits: int, frac: int, numel: int):
        super().__init__()
        self.bits = bits
        self.frac = nn.Parameter(torch.tensor(float(frac)))
        self.scale = 1.0 / math.sqrt(numel * code_range(bits)[1])  # LSQ's gradient scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = code_range(self.bits)
        step = torch.exp2(-round_ste(scale_grad(self.frac, self.scale)))
        return round_ste(torch.clamp(x / step, lo, hi)) * step

    @property
    def fraction_bits(self) -> int:
        return int(torch.round(self.frac.detach()))


@dataclass
class QFX(Method):
    name: str = "qfx"
    bits: int = 8  # W of every weight, bias and activation (ap_fixed<W, I>)
    epochs: int = 10  # QAT passes over the model's training split
    batch_size: int = 64
    lr: float = 1e-4  # Adam, weights and biases
    point_lr: float = 1e-2  # Adam, the binary-point parameters f
    seed: int = 0
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Dai et al., QFX: Trainable Fixed-Point Quantization for Deep Learning Acceleration on FPGAs"
    applies_to: ClassVar[tuple[str, ...]] = ("image_classifier",)
    execution: ClassVar[str] = f"{EXECUTION_EMULATED_PREFIX}fixed-point"

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)  # codes pack at <= 8 bits; float64 sums stay exact
        for key in ("epochs", "batch_size"):
            check_range(f"method.{key}", getattr(self, key), 1, 10_000)
        for key in ("lr", "point_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be positive", f"e.g. method.{key}=1e-3")

    def _layers(self, model) -> list:
        refs = list(model.adapter.linears())
        for name, m in model.module.named_modules():
            if next(m.parameters(recurse=False), None) is not None and not isinstance(m, (nn.Conv2d, nn.Linear)):
                raise NotApplicable(f"method 'qfx' casts conv/linear layers only; {name} ({type(m).__name__}) has "
                                    "parameters", "use a classifier of Conv2d/Linear layers with ReLU/max-pool")
        return refs

    def _training_split(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        info = model.info
        if "dataset" not in info or "split_seed" not in info:
            raise NotApplicable(f"method 'qfx' trains on the model's own training split; model '{model.spec.name}' "
                                "does not record one (dataset, split_seed)", "use a suite classifier (lenet_digits)")
        data = load_images(info["dataset"])
        train, _ = heldout_split(data.images.shape[0], torch.Generator().manual_seed(info["split_seed"]))
        return data.images[train], data.labels[train]

    def compress(self, model, calib, budget) -> Packed:
        refs = self._layers(model)
        net = model.module
        x_train, y_train = self._training_split(model)
        torch.manual_seed(self.seed)
        with torch.no_grad(), fp32():
            seen: dict[str, torch.Tensor] = {}
            hooks = [r.module.register_forward_hook(lambda m, a, out, n=r.name: seen.__setitem__(n, out.detach()))
                     for r in refs]
            net(x_train.float())
            for h in hooks:
                h.remove()
        base = {r.name: r.module.weight.detach().clone() for r in refs}
        points = {"input": BinaryPoint(self.bits, best_frac(x_train, self.bits), x_train[0].numel())}
        for r in refs:  # each starts at the F of least cast error on the trained model's values
            for what, values, numel in (("weight", r.module.weight.detach(), r.module.weight.numel()),
                                        ("bias", r.module.bias.detach(), r.module.bias.numel()),
                                        ("out", seen[r.name], seen[r.name][0].numel())):
                points[f"{r.name}.{what}"] = BinaryPoint(self.bits, best_frac(values, self.bits), numel)
        initial = {k: p.fraction_bits for k, p in points.items()}
        history = self._train(net, refs, points, x_train, y_train)
        fracs = {k: p.fraction_bits for k, p in points.items()}
        packed = Packed(net, self.name, self.execution)
        with torch.no_grad():
            for r in refs:
                m = r.module
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
                parametrize.remove_parametrizations(m, "bias", leave_parametrized=False)
                stored = {"frac": torch.tensor([fracs[f"{r.name}.{k}"] for k in ("weight", "bias", "out")],
                                               dtype=torch.int8)}
                for key, what in (("qweight", "weight"), ("qbias", "bias")):
                    t = getattr(m, what)
                    codes = torch.clamp(torch.round(t * 2.0 ** fracs[f"{r.name}.{what}"]), *code_range(self.bits))
                    stored[key] = pack_bits(codes + 2 ** (self.bits - 1), self.bits)
                if r is refs[0]:
                    stored["frac_in"] = torch.tensor([fracs["input"]], dtype=torch.int8)
                packed.layers[r.name] = stored
                packed.layer_format[r.name] = self.layer_format()
                self.restore_layer(model, r, stored)
                packed.per_layer.append({**layer_stats(r, base[r.name], m.weight), "types": self.types(stored)})
        packed.training = TrainingRecord([history])
        packed.info.update({"bits": self.bits, "train_images": int(x_train.shape[0]), "epochs": self.epochs,
                            "binary_points_moved": sum(initial[k] != fracs[k] for k in fracs),
                            "input_type": ap_fixed(self.bits, fracs["input"])})
        return self.runtime_hooks(model, packed)

    def _train(self, net, refs, points, x, y):
        handles = [refs[0].module.register_forward_pre_hook(lambda m, a: (points["input"](a[0]), *a[1:]))]
        for r in refs:
            parametrize.register_parametrization(r.module, "weight", points[f"{r.name}.weight"])
            parametrize.register_parametrization(r.module, "bias", points[f"{r.name}.bias"])
            handles.append(r.module.register_forward_hook(lambda m, a, out, q=points[f"{r.name}.out"]: q(out)))
        weights = [p for n, p in net.named_parameters() if n.endswith(".original")]
        for p in net.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": weights, "lr": self.lr},
                                {"params": [p.frac for p in points.values()], "lr": self.point_lr}])
        g = torch.Generator().manual_seed(self.seed)
        n = x.shape[0]
        per_epoch = math.ceil(n / self.batch_size)
        order = [torch.arange(n)]

        def step_fn(step):
            if step % per_epoch == 0:
                order[0] = torch.randperm(n, generator=g)
            idx = order[0][(step % per_epoch) * self.batch_size:][: self.batch_size]
            with fp32():
                return F.cross_entropy(net(x[idx].float()), y[idx]), {}

        net.train()
        try:
            history = Trainer("qfx quantization-aware training", opt, self.epochs * per_epoch,
                              samples_per_step=self.batch_size, train_samples=n, objective="cross-entropy",
                              progress=False).run(step_fn)
        finally:
            for h in handles:
                h.remove()
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        return history

    def layer_format(self) -> LayerFormat:
        w = self.bits
        return LayerFormat("int", w, f"qfx-fx{w}-pow2-tensor", "tensor", symmetric=True).with_act(
            ActFormat(w, "int", "per_tensor", "static", detail=("pow2", "learned")))

    def types(self, stored: dict[str, torch.Tensor]) -> dict[str, str]:
        """A layer's ap_fixed types: weight and bias as stored, result rounded and saturated (fixed_cast)."""
        fw, fb, fo = (int(v) for v in stored["frac"])
        return {"weight": ap_fixed(self.bits, fw), "bias": ap_fixed(self.bits, fb),
                "result": ap_fixed(self.bits, fo, rounding=True)}

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        m = ref.module
        for key, what, frac in (("qweight", "weight", 0), ("qbias", "bias", 1)):
            t = getattr(m, what)
            codes = unpack_bits(stored[key], self.bits, t.numel(), tuple(t.shape)).to(torch.float64)
            t.data = (codes - 2 ** (self.bits - 1)) / 2.0 ** int(stored["frac"][frac])

    def runtime_hooks(self, model, packed) -> Packed:
        """Float64 convs/linears on the fixed-point values, the input and every layer's output cast to its type;
        the types are declared on the model for backends that compile them (hardware/fpga_sim.py)."""
        refs = list(model.adapter.linears())
        stored = {r.name: packed.layers[r.name] for r in refs}
        frac_in = int(stored[refs[0].name]["frac_in"][0])
        for r in refs:
            r.module.double()  # exact sums: float64 holds every partial sum of W <= 8 bit products
            fo = int(stored[r.name]["frac"][2])
            r.module.register_forward_hook(lambda m, a, out, f=fo: fixed_cast(out, f, self.bits))
        refs[0].module.register_forward_pre_hook(
            lambda m, a: (fixed_cast(a[0].to(torch.float64), frac_in, self.bits), *a[1:]))
        packed.model.bench_fixed_point = {"input": ap_fixed(self.bits, frac_in, rounding=True),
                                          "layers": {r.name: self.types(stored[r.name]) for r in refs}}
        return packed
