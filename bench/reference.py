"""The uncompressed base model as a task's reference, and how far a model's next-token distribution is from it.

`Reference` is what the runner hands a task that declares `needs_reference` (bench/plugins.py): the base model
the run loaded, never a reloaded or other copy. `logits(ids)` returns the base model's logits on the same input
ids the task fed the evaluated model, computed in the precision active at the call, which inside a run is the
run's (`precision=`): a bf16 run is compared with the base model's bf16 forward, an fp32 run with its fp32 one.

Computed once: what enters the base model's output head (the final norm's output, seqlen x hidden; 4.7 MB for a
2048-token window of a 576-wide model) is cached per window by content hash (base weights sha256, the window's
token ids, its length, the precision, the task's protocol version), and later runs rebuild the logits with the
base model's own head: one matmul instead of a whole forward. The rebuilt logits are bit-identical to the
forward's: that is checked when an entry is written (`torch.equal`), and a model whose forward does more after
its head (e.g. logit soft-capping) is never cached, its forward runs every time. Caching the full logits instead
would take 2048 x 49152 values per window (~30 GB for WikiText-2's 148 windows); caching only the top-k
log-probabilities would make the divergence a lower bound instead of exact.

The baseline cell evaluates the base model itself: its task takes the logits from `logits()` instead of a forward
of its own (`Reference(..., is_evaluated=True)`), so the baseline's evaluation fills the cache and the first
compressed run of a fresh store does not run the base model's forward over the same windows again.

`next_token_divergence` is the measure llama.cpp's perplexity tool reports with `--kl-divergence`
(tools/perplexity/perplexity.cpp, read for its definitions): per token KL(P_base || P) = sum_v P_base(v)
(log P_base(v) - log P(v)) in nats, and whether both models' top-1 tokens (argmax, first index on ties) agree
("same top p"). Unlike llama.cpp, the base log-probabilities are exact (it stores them as 16-bit values and skips
P_base < e^-16); both log-softmaxes are computed in fp32 from the logits as the models produced them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from bench import precision
from bench.cache import ArtifactStore, content_key
from bench.errors import ArtifactCorrupt, ResourceError
from bench.models import LoadedModel

FORMAT = "head-input-1"  # what a cache entry holds; a change here invalidates every entry


class Reference:
    """The base model a run loaded, answering with its logits on the ids a task evaluates (see the module doc)."""

    def __init__(self, base: LoadedModel, cache_root: str | Path | None = None, is_evaluated: bool = False):
        self.base = base
        self.is_evaluated = is_evaluated  # the model the task evaluates is this base model (the baseline cell)
        self.store = ArtifactStore(cache_root) if cache_root is not None else None
        self.cacheable = True  # False once the base model's logits are shown not to be head(head input)
        self.hits = self.misses = 0

    def key(self, ids: torch.Tensor, protocol: str) -> str:
        tokens = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
        return content_key("reference_logits", FORMAT, self.base.weights_sha256, tokens, int(ids.shape[-1]),
                           precision.active(), protocol)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, protocol: str) -> torch.Tensor:
        """The base model's logits for `ids` (1, seqlen), in the dtype its forward gives in the active precision."""
        head = self.base.adapter.head()
        key = self.key(ids, protocol) if self.store is not None and self.cacheable else None
        if key is not None and self.store.has(key):
            try:
                tensors, _ = self.store.load(key)
                self.hits += 1
                return head(tensors["head_input"])
            except (ArtifactCorrupt, KeyError):
                self.store.discard(key)  # recomputed below and written again
        captured = []
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            logits = self.base.module(ids, use_cache=False).logits
        finally:
            hook.remove()
        self.misses += 1
        if key is not None:
            if len(captured) == 1 and torch.equal(head(captured[0]), logits):
                try:
                    self.store.save(key, {"head_input": captured[0].contiguous()},
                                    {"format": FORMAT, "precision": precision.active(), "protocol": protocol})
                except ResourceError:
                    pass  # an unwritable results directory only costs the next run the forward again
            else:
                self.cacheable = False
        return logits

    def describe(self) -> dict:
        return {"model": self.base.spec.name, "weights_sha256": self.base.weights_sha256,
                "precision": precision.active(), "inputs": "the windows the evaluated model scored"}


def next_token_divergence(base_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of (positions, vocab) logits: KL(P_base || P) in nats over the full vocabulary (fp32), and
    whether both argmaxes agree. Computed `chunk` positions at a time: a window's full log-softmax would be
    another 400 MB (2048 x 49152 fp32) per model."""
    if base_logits.shape != logits.shape or base_logits.dim() != 2:
        raise ValueError(f"logits of the base model {tuple(base_logits.shape)} and of the model "
                         f"{tuple(logits.shape)} must both be (positions, vocab)")
    n = logits.shape[0]
    kld = torch.empty(n, dtype=torch.float32)
    agree = torch.empty(n, dtype=torch.bool)
    with precision.fp32():
        for s in range(0, n, chunk):
            b, q = base_logits[s:s + chunk].float(), logits[s:s + chunk].float()
            agree[s:s + chunk] = b.max(-1).indices == q.max(-1).indices
            log_pb = torch.log_softmax(b, -1)
            diff = torch.log_softmax(q, -1).sub_(log_pb).neg_()  # log P_base - log P
            kld[s:s + chunk] = log_pb.exp_().mul_(diff).sum(-1)
    return kld, agree
