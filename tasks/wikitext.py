"""`wikitext`: WikiText-2 raw test token perplexity with the GPTQ protocol.

Protocol (Frantar et al., GPTQ; also SparseGPT, OmniQuant, BinaryMoS): the test rows joined with "\\n\\n",
tokenized once, cut into non-overlapping windows of `seqlen` tokens (the remainder dropped), each window
scored independently (no context carried over); perplexity = exp(mean token NLL over all windows). The
metric name carries the protocol and window length, e.g. `wikitext2.ppl_token.gptq_s2048`, plus
`.firstN` when `limit` evaluates only the first N windows. Per-window mean NLLs are kept for paired tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench import data
from bench.errors import ConfigError, DataCorrupt, NumericalFailure
from bench.metrics import Metric
from bench.plugins import Task, Workload


@dataclass
class WikiText2Perplexity(Task):
    name: str = "wikitext"
    split: str = "test"
    seqlen: int = 2048
    limit: int | None = None
    prompt_tokens: int = 128  # workload for the hardware backend
    decode_tokens: int = 32
    protocol_version = "gptq-1"

    def __post_init__(self):
        if self.seqlen <= 0:
            raise ConfigError(f"task.seqlen={self.seqlen} must be positive", "use e.g. task.seqlen=2048")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"task.limit={self.limit} must be positive or null", "drop it for the full test set")
        if self.split not in ("test", "validation"):
            raise ConfigError(f"task.split={self.split} is unknown", "use test or validation")

    @property
    def metric_name(self) -> str:
        split = "" if self.split == "test" else f".{self.split}"
        return f"wikitext2{split}.ppl_token.gptq_s{self.seqlen}{self.limit_tag()}"

    def token_ids(self, model, data_root=None) -> torch.Tensor:
        rows = data.wikitext2_rows(self.split, data_root)
        return data.token_ids(model.tokenizer, "\n\n".join(rows))

    @torch.inference_mode()
    def evaluate(self, model, data_root=None) -> list[Metric]:
        ids = self.token_ids(model, data_root)
        n_windows = ids.shape[1] // self.seqlen
        if n_windows == 0:  # a truncated file: no window to score, no perplexity to report
            raise DataCorrupt(f"WikiText-2 {self.split} text has {ids.shape[1]} tokens, fewer than one window of "
                              f"task.seqlen={self.seqlen}",
                              "restore the data file (see SOURCE.md) or lower task.seqlen")
        if self.limit:
            n_windows = min(n_windows, self.limit)
        module = model.module
        nlls = []
        for i in tqdm(range(n_windows), desc=f"wikitext2 ppl (s{self.seqlen})", unit="window"):
            batch = ids[:, i * self.seqlen:(i + 1) * self.seqlen]
            logits = module(batch, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(float(loss))
        mean_nll = sum(nlls) / len(nlls)
        # GPTQ computes exp(sum(loss_i * seqlen) / (n * seqlen)): the mean of per-window mean NLLs.
        ppl = math.exp(mean_nll)
        if not math.isfinite(ppl):
            raise NumericalFailure(f"perplexity is {ppl} (model produced non-finite log-likelihoods)",
                                   "the compressed model is numerically broken; recorded as failed")
        return [Metric(self.metric_name, ppl, "lower", unit="ppl", per_sample=nlls,
                       per_sample_name="window_mean_nll",
                       notes={"n_windows": n_windows, "n_tokens": int(ids.shape[1]), "seqlen": self.seqlen,
                              "protocol": "GPTQ: '\\n\\n'.join(rows), non-overlapping windows, exp(mean NLL)"})]

    def workload(self, model, data_root=None) -> Workload:
        ids = self.token_ids(model, data_root)
        return Workload("causal_lm", ids[:, :self.prompt_tokens], self.decode_tokens)
