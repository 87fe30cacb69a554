"""Running the real lm-evaluation-harness on an in-memory (compressed) model.

Tasks use lm-eval's stock task definitions (prompts, metrics, aggregation, stderr): bench only overrides
the data source (`dataset_path`/`dataset_kwargs`) to point at local files when they exist. The model is
wrapped by lm-eval's own `HFLM` around the in-memory module, so what is scored is exactly the packed model.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path

import torch

from bench import precision
from bench.cache import atomic_write_bytes


def hflm(model, max_length: int, batch_size: int = 1):
    from lm_eval.models.huggingface import HFLM

    class FP32LogitsHFLM(HFLM):
        """lm-eval's HFLM, with the logits upcast before lm-eval's log_softmax: under precision=bf16 the head
        computes in bf16 and autocast leaves log_softmax in its input's dtype (a no-op under fp32)."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            return super()._model_call(inps, attn_mask, labels).float()

    # HFLM opens its own autocast region around every forward, *disabled* unless it is given a mixed-precision
    # dtype: the run's precision goes through lm-eval's own mechanism, or bf16 runs would score in fp32
    mixed = torch.bfloat16 if precision.active() == "bf16" else None
    return FP32LogitsHFLM(pretrained=model.module, tokenizer=model.tokenizer, max_length=max_length,
                          batch_size=batch_size, device="cpu", dtype=torch.float32, mixed_precision_dtype=mixed)


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Materialise local documents once as JSONL for `datasets`' json builder (atomic; reused)."""
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if not path.exists() or path.read_bytes() != blob:
        atomic_write_bytes(path, blob)
    return path


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval indexes its thousands of task YAMLs once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def evaluate(lm, task_configs: list[dict], limit: int | None = None, log_samples: bool = True,
             bootstrap_iters: int = 0) -> dict:
    """Run lm-eval's `simple_evaluate` with stock tasks updated by `task_configs` (data source only)."""
    from lm_eval import evaluator

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # lm-eval consumes the dicts it is given (it pops their keys): hand it copies
    return evaluator.simple_evaluate(model=lm, tasks=copy.deepcopy(task_configs), task_manager=task_manager(),
                                     limit=limit, log_samples=log_samples, bootstrap_iters=bootstrap_iters)
