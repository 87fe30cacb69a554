"""`wikitext_lmeval`: WikiText-2 through the real lm-evaluation-harness `wikitext` task.

lm-eval's task is document-level (EleutherAI/wikitext_document_level, `loglikelihood_rolling` over each
whole article) and reports word perplexity, byte perplexity and bits per byte; its numbers depend on
`max_length` (the rolling window), which is recorded in the metric name. Offline, the documents are built
from the local raw file by splitting at top-level " = Title = " headings, as the document-level dataset
does (62 test documents); online without local files, the stock hub dataset is used unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench import data, lmeval
from bench.errors import ConfigError, NumericalFailure
from bench.metrics import Metric
from bench.plugins import Task, Workload

def _is_top_heading(line: str) -> bool:
    # sub-headings are " = = Title = = "; collapse them so only " = Title = " counts
    r = line.replace("= = =", "===").replace("= =", "==").strip()
    return r.startswith("= ") and r.endswith(" =")


def wikitext_documents(raw_text: str) -> list[str]:
    """Split a WikiText raw file into articles the way EleutherAI/wikitext_document_level does: lines are
    grouped until the next top-level heading, joined with "\n"; a whitespace-only group is dropped."""
    pages, current = [], []
    for line in raw_text.split("\n"):
        if _is_top_heading(line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


@dataclass
class WikiTextLmEval(Task):
    name: str = "wikitext_lmeval"
    split: str = "test"
    max_length: int = 2048
    batch_size: int = 1
    limit: int | None = None
    prompt_tokens: int = 128
    decode_tokens: int = 32
    protocol_version = "lm-eval-0.4.11-wikitext-2.0"

    def __post_init__(self):
        if self.max_length <= 0:
            raise ConfigError(f"task.max_length={self.max_length} must be positive", "e.g. task.max_length=2048")
        if self.split != "test":
            raise ConfigError("lm-eval's wikitext task scores the test split", "use task.split=test")

    def task_config(self, data_root=None) -> dict:
        path = data.local_file("wikitext-2-raw-v1/wiki.test.raw", data_root)
        if path is None:
            if data.hub_offline():
                raise data.missing("wikitext-2-raw-v1/wiki.test.raw", data_root,
                                   hub="EleutherAI/wikitext_document_level")
            return {"task": "wikitext"}  # stock: the hub's document-level dataset
        docs = wikitext_documents(data.read_text(path))
        out = lmeval.write_jsonl([{"page": d} for d in docs], data.cache_dir() / "wikitext2_test_documents.jsonl")
        return {"task": "wikitext", "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(out)}},
                "training_split": None, "validation_split": None, "test_split": "test"}

    def evaluate(self, model, data_root=None) -> list[Metric]:
        lm = lmeval.hflm(model, self.max_length, self.batch_size)
        out = lmeval.evaluate(lm, [self.task_config(data_root)], limit=self.limit)
        res = out["results"]["wikitext"]
        samples = out.get("samples", {}).get("wikitext", [])
        per_doc_ll = [float(s["resps"][0][0]) if isinstance(s["resps"][0][0], (int, float))
                      else float(s["resps"][0][0][0]) for s in samples]
        suffix = f".lmeval_ml{self.max_length}{self.limit_tag()}"
        metrics = []
        for key, direction, unit in (("word_perplexity", "lower", "ppl"), ("byte_perplexity", "lower", "ppl"),
                                     ("bits_per_byte", "lower", "bits")):
            v = float(res[f"{key},none"])
            if not math.isfinite(v):
                raise NumericalFailure(f"lm-eval {key} is {v}", "the compressed model is numerically broken")
            metrics.append(Metric(f"wikitext2.{key.replace('_perplexity', '_ppl')}{suffix}", v, direction,
                                  unit=unit, per_sample=per_doc_ll, per_sample_name="document_loglikelihood",
                                  notes={"n_documents": len(samples), "max_length": self.max_length,
                                         "lm_eval_version": out.get("versions", {}).get("wikitext")}))
        return metrics

    def workload(self, model, data_root=None) -> Workload:
        rows = data.wikitext2_rows("test", data_root)
        ids = model.tokenizer("\n\n".join(rows[:200]), return_tensors="pt").input_ids
        return Workload("causal_lm", ids[:, :self.prompt_tokens], self.decode_tokens)
