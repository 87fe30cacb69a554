"""Binary convolutions trained by distillation: what the conv-binarizing methods (`birealnet`, `biper`) share.

Each target conv of an image model (the ConvAdapter's layers; the first and the last stay full precision with
`keep_first_last`, the BiBench protocol) becomes a `BinaryConv`:

    y = conv(sign(x), B) (+ x where the conv keeps the shape of its input: Bi-Real Net's real-valued shortcut)

with B = scale_r * (+-1) per output channel r. The method supplies a `WeightBinarizer` (how the latent weight
becomes B and what gradient flows back); the rest is the same for every method and lives here:

- Activations: sign(x) forward (sign(0) = +1), Bi-Real Net's ApproxSign gradient (the derivative of its
  piecewise quadratic, 2 - 2|x| on |x| < 1) evaluated on x divided by its per-image standard deviation, as
  BiPer's reference normalizes before binarizing: these networks have no BatchNorm, so without it almost every
  activation would sit outside |x| < 1 and get no gradient. The forward value is sign(x) either way.
- Scale: these networks have no BatchNorm after the binary conv (Bi-Real Net has one), so the per-channel scale
  also carries the activation magnitude: it starts as mean|x_in| (the layer's mean input magnitude on the
  calibration images, XNOR-Net's beta, made static) times the channel's mean|K|, and is trained.
- Shortcut: the binary branch starts from K = W - I (I the identity kernel), so that branch + x reproduces the
  pretrained conv W before binarization; where the shapes differ (channels change, stride, no 'same' padding)
  there is no shortcut, K = W, and the record names those layers.
- Training: the student (copy of the model, every other parameter frozen) is distilled from the uncompressed
  model on the calibration images (MSE of the outputs in [0, 1] units), AdamW with warm-up and cosine decay,
  steps / batch / lr from `budget=`, each batch drawn with replacement (seeded), on bench.training's `Trainer`:
  the same budget for every method; the held-out calibration images give the validation loss.
- Storage: packed sign bits (1 bit per weight) + one fp16 scale per output channel (+ fp16 bias); the model that
  is evaluated runs exactly those values, and a restore rebuilds the same BinaryConvs from them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import NotApplicable
from bench.layer_format import ActFormat, LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import pack_bits, unpack_bits
from bench.quant.binary import signs
from bench.quant.integer import restore_bias, stored_bias
from bench.training import Trainer, TrainingRecord, budget_adamw, budget_schedule

ACT_MAG_IMAGES = 16  # calibration images the activation magnitudes are measured on


class ApproxSign(torch.autograd.Function):
    """sign forward; Bi-Real Net's ApproxSign derivative 2 - 2|x| (0 outside |x| < 1) backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return signs(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp(min=0)


def binarize_activations(x: torch.Tensor) -> torch.Tensor:
    # fp32 statistic: under autocast x may be bf16
    sigma = x.detach().float().flatten(1).std(dim=1).clamp(min=1e-5).view(-1, *([1] * (x.dim() - 1)))
    return ApproxSign.apply(x / sigma)


def keeps_shape(conv: nn.Conv2d) -> bool:
    """Does the conv map its input to an output of the same shape (so a shortcut x + conv(x) exists)?"""
    same = all(s == 1 for s in conv.stride) and all(
        2 * p == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))
    return conv.in_channels == conv.out_channels and same and conv.padding != "valid"


class WeightBinarizer(nn.Module):
    """How a method turns the latent weight into B = scale * (+-1). Subclasses set `latent` and the scale from
    the kernel K and the activation magnitude in `__init__`."""

    def forward(self) -> torch.Tensor:  # the weight the training forward uses (out, in, kh, kw)
        raise NotImplementedError

    def sign_bits(self) -> torch.Tensor:  # +-1 (out, in, kh, kw), what is stored
        raise NotImplementedError

    def scale(self) -> torch.Tensor:  # (out, 1, 1, 1), what is stored
        raise NotImplementedError


class BinaryConv(nn.Conv2d):
    """A Conv2d whose input is binarized and whose weight is B (from `binarizer` while training, then frozen
    as the stored +-scale values), plus the real-valued shortcut when `shortcut`. A Conv2d subclass, so the
    adapter, MAC counters and backends still see a conv."""

    def __init__(self, conv: nn.Conv2d, shortcut: bool, binarizer: WeightBinarizer | None = None):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        self.shortcut = shortcut
        self.binarizer = None
        self.requires_grad_(False)  # weight holds B once frozen; the latent weight lives in the binarizer
        if conv.bias is not None:
            self.bias.data.copy_(conv.bias.data)
        self.binarizer = binarizer

    @torch.no_grad()
    def freeze(self, sign_pm1: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight.copy_(sign_pm1 * scale.float().view(-1, 1, 1, 1))
        self.binarizer = None
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.binarizer is None else self.binarizer()
        y = self._conv_forward(binarize_activations(x), w, self.bias)
        return y + x if self.shortcut else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binary, shortcut={self.shortcut}"


def identity_kernel(conv: nn.Conv2d) -> torch.Tensor:
    return nn.init.dirac_(torch.empty_like(conv.weight), groups=conv.groups)


@torch.no_grad()
def input_magnitudes(module: nn.Module, refs: list, images: torch.Tensor) -> dict[str, float]:
    """mean |x| of each target conv's input over the first calibration images."""
    sums: dict[str, list[float]] = {r.name: [] for r in refs}
    handles = [r.module.register_forward_pre_hook(
        lambda _m, args, name=r.name: sums[name].append(float(args[0].float().abs().mean()))) for r in refs]
    try:
        for x in images[:ACT_MAG_IMAGES].split(4):
            module(x)
    finally:
        for h in handles:
            h.remove()
    return {k: sum(v) / len(v) for k, v in sums.items()}


@dataclass
class BinaryConvMethod(Method):
    """Base of the conv-binarizing methods: targets, student, distillation, freezing, storage, restore. A
    subclass provides `make_binarizer` (and may react to the training step in `on_step`)."""

    keep_first_last: bool = True  # first and last conv stay full precision (BiBench), recorded
    seed: int = 0
    family: ClassVar[str] = "binarization"
    applies_to: ClassVar[tuple[str, ...]] = ("image_sr", "image_classifier")
    needs_calibration: ClassVar[bool] = True
    # 1 bit + an fp16 scale per output channel, binary inputs (the method's sign of the activations)
    layer_format: ClassVar[LayerFormat] = LayerFormat.binary("binary-1bit-chscale-fp16", act=ActFormat(1, "binary"))

    def check_applicable(self, model) -> None:
        if not any(isinstance(m, nn.Conv2d) for m in model.module.modules()):
            raise NotApplicable(f"method '{self.name}' binarizes convolutions and {model.kind} model "
                                f"'{model.spec.name}' has none", "use an image model, e.g. model=rlfn")
        super().check_applicable(model)

    def make_binarizer(self, kernel: torch.Tensor, act_mag: float) -> WeightBinarizer:
        raise NotImplementedError

    def on_step(self, step: int, steps: int, layers: list[BinaryConv]) -> None:
        """Called before each training step (a method with training stages switches here)."""

    def stages(self, steps: int) -> list[tuple[str, int]]:
        """(name, first step) of each training stage the method switches between in `on_step`: each is recorded
        and judged apart (one optimizer and one lr schedule run through them all)."""
        return [(f"{self.name} distillation", 0)]

    def targets(self, model) -> list:
        refs = [r for r in model.adapter.linears() if isinstance(r.module, nn.Conv2d)]
        return refs[1:-1] if self.keep_first_last else refs

    def compress(self, model, calib, budget) -> Packed:
        self.check_applicable(model)
        images = calib.windows * (model.info["input_range"] / 255.0)
        teacher = model.module.eval()
        refs = self.targets(model)
        mags = input_magnitudes(teacher, refs, images)
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(False)
        from bench.models import adapter_for

        s_adapter = adapter_for(student)
        torch.manual_seed(self.seed)
        layers: dict[str, BinaryConv] = {}
        for ref in [r for r in s_adapter.linears() if r.name in mags]:
            conv, shortcut = ref.module, keeps_shape(ref.module)
            kernel = conv.weight.detach().float() - (identity_kernel(conv) if shortcut else 0)
            layer = BinaryConv(conv, shortcut, self.make_binarizer(kernel, mags[ref.name]))
            s_adapter.replace_linear(ref, layer)
            layers[ref.name] = layer
        params = [p for m in layers.values() for p in m.binarizer.parameters()]
        heldout = None if calib.heldout is None else calib.heldout * (model.info["input_range"] / 255.0)
        record = self._train(teacher, student, params, images, heldout, budget, list(layers.values()),
                             model.info["input_range"])
        packed = Packed(student, self.name, self.execution)
        with torch.no_grad():
            for ref in refs:
                layer = layers[ref.name]
                b, scale = layer.binarizer.sign_bits(), layer.binarizer.scale().reshape(-1, 1).to(torch.float16)
                layer.freeze(b, scale)
                stored = {"qweight": pack_bits((b.reshape(b.shape[0], -1) > 0).to(torch.uint8), 1), "scale": scale,
                          **stored_bias(layer)}
                effective = layer.weight + (identity_kernel(layer) if layer.shortcut else 0)  # what replaces W
                packed.per_layer.append({**layer_stats(ref, ref.module.weight, effective),
                                         "shortcut": layer.shortcut, "input_mean_abs": mags[ref.name]})
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = self.layer_format.with_notes("shortcut") if layer.shortcut \
                    else self.layer_format
        student.eval()
        packed.training = record
        kept = [r.name for r in model.adapter.linears() if r.name not in packed.layers]
        no_shortcut = [n for n, m in layers.items() if not m.shortcut]
        packed.info.update({"layers_kept_full_precision": len(kept), "layers_binarized": len(refs),
                            "layers_with_shortcut": len(refs) - len(no_shortcut),
                            "layers_without_shortcut": ",".join(no_shortcut),
                            "activations": "binary sign(x), ApproxSign gradient"})
        packed.extra_metadata["kept_full_precision"] = ",".join(kept)
        return packed

    def _train(self, teacher, student, params, images, heldout, budget, layers, out_range: float):
        steps = budget.steps()
        g = torch.Generator().manual_seed(self.seed)
        opt = budget_adamw(params, budget)
        student.train()

        def loss_of(x):
            with torch.no_grad():
                target = teacher(x).float() / out_range
            return F.mse_loss(student(x).float() / out_range, target)  # the loss from fp32 outputs

        def step_fn(step):
            self.on_step(step, steps, layers)
            return loss_of(images[torch.randint(0, images.shape[0], (budget.batch_size,), generator=g)]), {}

        def validate():
            student.eval()
            with torch.no_grad():
                total = sum(float(loss_of(x)) * x.shape[0] for x in heldout.split(budget.batch_size))
            student.train()
            return total / heldout.shape[0], {}

        lr_at = budget_schedule(budget, steps)
        record = TrainingRecord()
        bounds = self.stages(steps) + [("", steps)]
        for (name, start), (_, end) in zip(bounds, bounds[1:]):
            if end <= start:
                continue
            trainer = Trainer(name, opt, end - start, lambda s, start=start: lr_at(start + s),
                              samples_per_step=budget.batch_size, train_samples=images.shape[0],
                              objective="MSE(student, teacher outputs) in [0, 1] units", validate=validate,
                              heldout_samples=0 if heldout is None else heldout.shape[0])
            record.add(trainer.run(lambda s, start=start: step_fn(start + s)))
        student.eval()
        return record

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        conv = ref.module
        n_out = conv.weight.shape[0]
        b = unpack_bits(stored["qweight"], 1, conv.weight.numel(), (n_out, conv.weight[0].numel())).float() * 2 - 1
        layer = BinaryConv(conv, keeps_shape(conv))
        layer.freeze(b.view_as(conv.weight), stored["scale"])
        restore_bias(layer, stored)
        model.adapter.replace_linear(ref, layer)
