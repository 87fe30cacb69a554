"""`commonsense_qa` (and one task alone, e.g. `piqa`): zero-shot multiple-choice accuracy through the real
lm-evaluation-harness, with lm-eval's stock task definitions (prompts, `acc`, `acc_norm`, stderr).

Only the data source is overridden: the local copies under `<data root>/qa/<task>/` are converted once to
the field layout of lm-eval's hub dataset for that task and handed to the stock task as JSON. Without
local files and online, the stock hub datasets are used unchanged. Fidelity of the local copies (see the
data root's SOURCE.md files): exact for piqa, winogrande, openbookqa; ARC has only 4-choice items;
BoolQ passages lack the hub's "<title> -- " prefix; HellaSwag lost the capitalisation of ctx_b, which is
restored by a heuristic (a final sentence fragment starting in lower case is capitalised as lm-eval's
`ctx_b.capitalize()` would). Each metric's notes and the run's tags say so.
"""

from __future__ import annotations

import bz2
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench import data, lmeval
from bench.errors import ConfigError, DataCorrupt, DataMissing, NumericalFailure
from bench.metrics import Metric
from bench.plugins import Task, Workload

LETTERS = "ABCDEFGHIJ"

# task -> (local file under qa/, split the stock task scores, fidelity note)
LOCAL = {
    "piqa": ("piqa/valid.jsonl", "validation", "exact (original release)"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", "validation",
                  "near: ctx_b capitalisation lost in the local copy, restored by heuristic"),
    "arc_easy": ("arc_easy/arc_easy.jsonl", "test", "near: every local item has 4 choices"),
    "arc_challenge": ("arc_challenge/arc_challenge.jsonl", "test", "near: every local item has 4 choices"),
    "winogrande": ("winogrande/winogrande.jsonl", "validation", "exact (sentence/options rebuilt)"),
    "boolq": ("boolq/boolq.jsonl", "validation", "not exact: passages lack the hub's '<title> -- ' prefix"),
    "openbookqa": ("openbookqa/openbook_qa.jsonl", "test", "exact"),
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in data.read_text(path).splitlines() if line.strip()]


def _mc(question_key: str, question: str, choices: list[str], gold: int, i: int) -> dict:
    labels = list(LETTERS[:len(choices)])
    return {"id": str(i), question_key: question, "choices": {"text": choices, "label": labels},
            "answerKey": labels[gold]}


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def recapitalize_ctx_b(ctx: str) -> str:
    """lm-eval builds ctx_a + " " + ctx_b.capitalize(); the local copy has ctx_b as written (lower case).
    Capitalise a final fragment (after the last sentence end) that starts in lower case."""
    cut = max(ctx.rfind(". "), ctx.rfind("? "), ctx.rfind("! "))
    head, frag = (ctx[:cut + 2], ctx[cut + 2:]) if cut >= 0 else ("", ctx)
    if frag[:1].islower():
        return head + frag.capitalize()
    return ctx


def convert(task: str, path: Path) -> list[dict]:
    """Local records -> the field layout of lm-eval's hub dataset for `task`."""
    if task == "piqa":
        labels = (path.parent / "valid-labels.lst").read_text().split()
        return [{**r, "label": int(lab)} for r, lab in zip(_jsonl(path), labels, strict=True)]
    if task in ("arc_easy", "arc_challenge"):
        return [_mc("question", _strip_prefix(r["query"], "Question: "), r["choices"], r["gold"], i)
                for i, r in enumerate(_jsonl(path))]
    if task == "openbookqa":
        return [_mc("question_stem", r["query"], r["choices"], r["gold"], i) for i, r in enumerate(_jsonl(path))]
    if task == "winogrande":
        out = []
        for r in _jsonl(path):
            a, b = r["context_options"]
            n = len(os.path.commonprefix([a, b]))  # any split reproduces both contexts exactly
            out.append({"sentence": a[:n] + "_ " + r["continuation"], "option1": a[n:], "option2": b[n:],
                        "answer": str(r["gold"] + 1)})
        return out
    if task == "boolq":
        out = []
        for r in _jsonl(path):
            passage, _, question = _strip_prefix(r["query"], "Passage: ").rpartition("\nQuestion: ")
            out.append({"passage": passage, "question": question.removesuffix("?"), "label": r["gold"]})
        return out
    if task == "hellaswag":
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        out = []
        for i in range(0, len(lines) - 5, 6):
            label, _, ctx = lines[i].partition(": ")
            out.append({"ind": i // 6, "activity_label": label, "ctx_a": recapitalize_ctx_b(ctx), "ctx_b": "",
                        "endings": lines[i + 2:i + 6], "label": lines[i + 1]})
        return out
    raise ConfigError(f"no local converter for task '{task}'", f"choose from {', '.join(LOCAL)}")


def load_local(task: str, path: Path) -> list[dict]:
    """`convert`, with a damaged file (bad JSON, missing field, truncated bz2, label count) said in one line."""
    try:
        return convert(task, path)
    except (ValueError, KeyError, IndexError, EOFError, OSError) as e:
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise DataCorrupt(f"data file '{path}' is not a readable {task} file ({type(e).__name__}: {detail})",
                          "restore it from its source (see SOURCE.md beside it)") from None


@dataclass
class CommonsenseQA(Task):
    name: str = "commonsense_qa"
    tasks: list[str] = field(default_factory=lambda: list(LOCAL))
    limit: int | None = None
    batch_size: int = 8
    max_length: int = 2048
    prompt_tokens: int = 128
    decode_tokens: int = 32
    protocol_version = "lm-eval-0.4.11-0shot"

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in LOCAL]
        if unknown or not self.tasks:
            raise ConfigError(f"unknown QA task(s) {unknown}", f"choose from {', '.join(LOCAL)}")
        if self.batch_size <= 0:
            raise ConfigError(f"task.batch_size={self.batch_size} must be positive", "e.g. task.batch_size=8")

    def task_config(self, task: str, data_root=None) -> dict:
        rel, split, _ = LOCAL[task]
        path = data.local_file(f"qa/{rel}", data_root)
        if path is None:
            if data.hub_offline():
                raise data.missing(f"qa/{rel}", data_root)
            return {"task": task}  # the stock hub dataset
        out = data.cache_dir() / f"{task}_{split}.jsonl"
        lmeval.write_jsonl(load_local(task, path), out)
        return {"task": task, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(out)}}, "training_split": None,
                "validation_split": split if split == "validation" else None,
                "test_split": split if split == "test" else None}

    def evaluate(self, model, data_root=None) -> list[Metric]:
        configs = []
        for t in self.tasks:
            try:
                configs.append(self.task_config(t, data_root))
            except (DataMissing, DataCorrupt) as e:  # the other tasks still run; the failure is recorded
                self.failures[t] = str(e)
        if not configs:
            raise DataMissing(f"no data for any of {', '.join(self.tasks)}", next(iter(self.failures.values())))
        lm = lmeval.hflm(model, self.max_length, self.batch_size)
        out = lmeval.evaluate(lm, configs, limit=self.limit, bootstrap_iters=1000)
        metrics, accs = [], []
        suffix = f".lmeval_0shot{self.limit_tag()}"
        for cfg in configs:
            t = cfg["task"]
            res = out["results"][t]
            samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
            for key in ("acc", "acc_norm"):
                if f"{key},none" not in res:
                    continue
                v = float(res[f"{key},none"])
                if not math.isfinite(v):
                    raise NumericalFailure(f"lm-eval {t} {key} is {v}", "the compressed model is numerically broken")
                se = res.get(f"{key}_stderr,none")
                metrics.append(Metric(f"{t}.{key}{suffix}", v, "higher", unit="fraction",
                                      stderr=float(se) if isinstance(se, (int, float)) else None,
                                      per_sample=[float(s[key]) for s in samples], per_sample_name=f"{key}_per_example",
                                      notes={"n": len(samples),
                                             "data": LOCAL[t][2] if cfg.get("dataset_path") else "hub",
                                             "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]]
                                                                for s in samples] if key == "acc" else None}))
                if key == "acc":
                    accs.append(v)
        if len(accs) > 1:  # the headline metric of a multi-task run: listed first
            metrics.insert(0, Metric(f"{self.name}.acc_mean_of_{len(accs)}_tasks{suffix}", sum(accs) / len(accs),
                                  "higher", unit="fraction",
                                  notes={"tasks": [c["task"] for c in configs], "failed": self.failures}))
        return metrics

    def workload(self, model, data_root=None) -> Workload:
        """A prefill of `prompt_tokens` tokens of this task's own (converted) examples."""
        for t in self.tasks:
            path = data.local_file(f"qa/{LOCAL[t][0]}", data_root)
            if path is not None:
                text = "\n".join(json.dumps(r) for r in load_local(t, path)[:50])
                ids = model.tokenizer(text, return_tensors="pt").input_ids
                return Workload("causal_lm", ids[:, :self.prompt_tokens], self.decode_tokens)
        raise DataMissing("no local QA data to build a timing workload from", "set paths.data_root")
