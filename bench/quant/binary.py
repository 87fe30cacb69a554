"""Sign binarization shared by the binary methods: sign with sign(0) = +1 (a stored bit always means +-1), the
clipped straight-through estimator that trains the latent weights through it, and the mean-centred row
binarization w ~ a * sign(w - m) + m of BiLLM and PB-LLM."""

from __future__ import annotations

import torch


def signs(w: torch.Tensor) -> torch.Tensor:
    """+1 where w >= 0, else -1, in w's dtype (torch.sign would give 0 at 0)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


class _ClippedSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, inclusive):
        ctx.save_for_backward(w)
        ctx.inclusive = inclusive
        return signs(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        inside = w.abs() <= 1 if ctx.inclusive else w.abs() < 1
        return grad * inside.to(grad.dtype), None


def clipped_sign(w: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    """sign(w) forward; the gradient passes where |w| <= 1 (Courbariaux et al.'s hardtanh STE), or |w| < 1 with
    `inclusive=False` (the bound BinaryMoS's reference code uses)."""
    return _ClippedSign.apply(w, inclusive)


def binarize_rows(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One binarization of the masked entries of each row: w ~ a * b + m with m the row's masked mean and a
    the mean |w - m|, both rounded to fp16 (stored); b = +1 where w >= m. Returns the approximation (zero
    outside the mask), the signs (bool) and the (a, m) pair per row."""
    count = mask.sum(dim=1).clamp(min=1)
    m = ((w * mask).sum(dim=1) / count).half().float()
    a = (((w - m[:, None]).abs() * mask).sum(dim=1) / count).half().float()
    positive = w >= m[:, None]
    approx = torch.where(positive, a[:, None], -a[:, None]) + m[:, None]
    return approx * mask, positive, torch.stack([a, m], dim=1)
