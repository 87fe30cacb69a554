"""`wikitext`: WikiText-2 raw test token perplexity with the GPTQ protocol.

Protocol (Frantar et al., GPTQ; also SparseGPT, OmniQuant, BinaryMoS): the test rows joined with "\\n\\n",
tokenized once, cut into non-overlapping windows of `seqlen` tokens (the remainder dropped), each window
scored independently (no context carried over); perplexity = exp(mean token NLL over all windows). The
metric name carries the protocol and window length, e.g. `wikitext2.ppl_token.gptq_s2048`, plus
`.firstN` when `limit` evaluates only the first N windows. Per-window mean NLLs are kept for paired tests.

Beside perplexity (`kl_vs_base`, on by default), a compressed model is compared with the uncompressed base model
the run loaded, on the same windows and in the same compute precision (bench/reference.py), by the measures
llama.cpp's perplexity tool reports with `--kl-divergence`, at every position the perplexity scores (seqlen - 1
per window):
- `wikitext2.kld_vs_base.gptq_s2048`: mean over all scored tokens of the exact full-vocabulary
  KL(P_base || P_model) in nats (equal-length windows, so also the mean of per-window means);
- `wikitext2.kld_p99_vs_base.gptq_s2048`: the 99th percentile of the per-token KL over all scored tokens (linear
  interpolation between order statistics, as llama.cpp); other percentiles are in its notes;
- `wikitext2.top1_agree_vs_base.gptq_s2048`: the share of scored tokens whose top-1 token is the same for both
  models (llama.cpp's "same top p", as a fraction).
Each carries a 95% percentile-bootstrap interval over windows (2000 resamples, seed 0; the percentile resamples
windows and pools their tokens) and the bootstrap standard error; per-window values are kept (mean KL, KL p99,
top-1 share). llama.cpp scores the second half of each context with a BOS token first; here the GPTQ windows are
scored whole, as for perplexity. The baseline run reports none of these: it is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench import data, stats
from bench.errors import ConfigError, DataCorrupt, NumericalFailure
from bench.metrics import Metric
from bench.plugins import Task, Workload
from bench.reference import Reference, next_token_divergence

KLD_PERCENTILES = (0.5, 0.9, 0.95, 0.99, 0.999)  # reported in the p99 metric's notes, as llama.cpp lists them


@dataclass
class WikiText2Perplexity(Task):
    name: str = "wikitext"
    split: str = "test"
    seqlen: int = 2048
    limit: int | None = None
    prompt_tokens: int = 128  # workload for the hardware backend
    decode_tokens: int = 32
    kl_vs_base: bool = True  # also KL divergence and top-1 agreement against the base model (compressed runs)
    protocol_version = "gptq-1"
    needs_reference = True

    def __post_init__(self):
        if self.seqlen <= 0:
            raise ConfigError(f"task.seqlen={self.seqlen} must be positive", "use e.g. task.seqlen=2048")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"task.limit={self.limit} must be positive or null", "drop it for the full test set")
        if self.split not in ("test", "validation"):
            raise ConfigError(f"task.split={self.split} is unknown", "use test or validation")
        if not isinstance(self.kl_vs_base, bool):
            raise ConfigError(f"task.kl_vs_base={self.kl_vs_base} is not true or false",
                              "use task.kl_vs_base=false to report perplexity only")

    def _name(self, measure: str) -> str:
        split = "" if self.split == "test" else f".{self.split}"
        return f"wikitext2{split}.{measure}.gptq_s{self.seqlen}{self.limit_tag()}"

    @property
    def metric_name(self) -> str:
        return self._name("ppl_token")

    def token_ids(self, model, data_root=None) -> torch.Tensor:
        rows = data.wikitext2_rows(self.split, data_root)
        return data.token_ids(model.tokenizer, "\n\n".join(rows))

    @torch.inference_mode()
    def evaluate(self, model, data_root=None, reference: Reference | None = None) -> list[Metric]:
        ids = self.token_ids(model, data_root)
        n_windows = ids.shape[1] // self.seqlen
        if n_windows == 0:  # a truncated file: no window to score, no perplexity to report
            raise DataCorrupt(f"WikiText-2 {self.split} text has {ids.shape[1]} tokens, fewer than one window of "
                              f"task.seqlen={self.seqlen}",
                              "restore the data file (see SOURCE.md) or lower task.seqlen")
        if self.limit:
            n_windows = min(n_windows, self.limit)
        module = model.module
        compare = self.kl_vs_base and reference is not None and not reference.is_evaluated
        fill = self.kl_vs_base and reference is not None and reference.is_evaluated  # the base's own evaluation
        nlls, token_kld, top1 = [], [], []
        for i in tqdm(range(n_windows), desc=f"wikitext2 ppl (s{self.seqlen})", unit="window"):
            batch = ids[:, i * self.seqlen:(i + 1) * self.seqlen]
            if fill:  # the same forward, through the reference: later runs find this window's base logits cached
                logits = reference.logits(batch, self.protocol_version).float()
            else:
                logits = module(batch, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(float(loss))
            if compare:
                base = reference.logits(batch, self.protocol_version)
                kld, agree = next_token_divergence(base[0, :-1], logits[0, :-1])
                del base
                token_kld.append(kld.numpy())
                top1.append(agree.double().mean().item())
        mean_nll = sum(nlls) / len(nlls)
        # GPTQ computes exp(sum(loss_i * seqlen) / (n * seqlen)): the mean of per-window mean NLLs.
        ppl = math.exp(mean_nll)
        if not math.isfinite(ppl):
            raise NumericalFailure(f"perplexity is {ppl} (model produced non-finite log-likelihoods)",
                                   "the compressed model is numerically broken; recorded as failed")
        metrics = [Metric(self.metric_name, ppl, "lower", unit="ppl", per_sample=nlls,
                          per_sample_name="window_mean_nll",
                          notes={"n_windows": n_windows, "n_tokens": int(ids.shape[1]), "seqlen": self.seqlen,
                                 "protocol": "GPTQ: '\\n\\n'.join(rows), non-overlapping windows, exp(mean NLL)"})]
        if compare:
            metrics += self._divergence_metrics(np.stack(token_kld), np.asarray(top1), reference)
        return metrics

    def _divergence_metrics(self, token_kld: np.ndarray, top1: np.ndarray, reference: Reference) -> list[Metric]:
        """The three comparisons with the base model from per-token KL (windows x scored tokens) and per-window
        top-1 agreement shares, each with its bootstrap interval over windows."""
        if not np.isfinite(token_kld).all():
            raise NumericalFailure("KL divergence from the base model is not finite (the model produced non-finite "
                                   "logits)", "the compressed model is numerically broken; recorded as failed")
        n_windows, per_window = token_kld.shape
        common = {"n_windows": n_windows, "tokens_per_window": per_window, "n_tokens": int(token_kld.size),
                  "reference": reference.describe(),
                  "computed": "exact: full-vocabulary softmax of both models' logits (fp32 log-softmax), every "
                              "position the perplexity scores; not a top-k approximation",
                  "interval": "95% percentile bootstrap over windows, 2000 resamples, seed 0; stderr = the "
                              "bootstrap replicates' standard deviation"}
        p99 = lambda x: np.quantile(x.reshape(*x.shape[:-2], -1), 0.99, axis=-1)  # noqa: E731 (tokens pooled)
        window_means = token_kld.mean(axis=1, dtype=np.float64)
        percentiles = np.quantile(token_kld.astype(np.float64), KLD_PERCENTILES)
        specs = [  # name, value, direction, unit, per-sample values, their name, statistic, samples resampled
            ("kld_vs_base", float(window_means.mean()), "lower", "nats/token", window_means, "window_mean_kld",
             stats.STATISTICS["window_mean_kld"], window_means,
             "KL(P_base || P_model) = sum_v P_base(v) (log P_base(v) - log P_model(v)) per token, mean over all "
             "scored tokens (llama.cpp's 'Mean KLD')"),
            ("kld_p99_vs_base", float(percentiles[KLD_PERCENTILES.index(0.99)]), "lower", "nats/token",
             np.quantile(token_kld.astype(np.float64), 0.99, axis=1), "window_kld_p99", p99, token_kld,
             "99th percentile of the per-token KL over all scored tokens, linear interpolation (llama.cpp's "
             "'99.0% KLD'); per-sample values are each window's own p99, the interval pools resampled windows"),
            ("top1_agree_vs_base", float(top1.mean()), "higher", "fraction of tokens", top1, "window_top1_agree",
             stats.STATISTICS["window_top1_agree"], top1,
             "share of scored tokens whose argmax (first index on ties) is the same token for both models "
             "(llama.cpp's 'Same top p', as a fraction)"),
        ]
        out = []
        for measure, value, direction, unit, per_sample, sample_name, statistic, resampled, what in specs:
            ci = stderr = None
            if n_windows >= 2:
                replicates = stats.bootstrap_replicates(resampled, statistic)
                ci, stderr = stats.percentile_interval(replicates), float(replicates.std(ddof=1))
            notes = {**common, "measure": what}
            if measure == "kld_p99_vs_base":
                notes["percentiles"] = {f"p{100 * q:g}": float(v) for q, v in zip(KLD_PERCENTILES, percentiles)}
                notes["percentiles"]["max"] = float(token_kld.max())
            out.append(Metric(self._name(measure), value, direction, unit=unit, stderr=stderr, ci=ci,
                              per_sample=[float(v) for v in per_sample], per_sample_name=sample_name, notes=notes))
        return out

    def workload(self, model, data_root=None) -> Workload:
        ids = self.token_ids(model, data_root)
        return Workload("causal_lm", ids[:, :self.prompt_tokens], self.decode_tokens)
