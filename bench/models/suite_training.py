"""Models the suite trains itself, trained once: the checkpoint and its training record live under
`<results>/trained/<key>.safetensors`, the key a content hash of the recipe, the data's sha256 and the source of
exactly the code training runs (not of whole files: an edit to the sampler must not retrain a model)."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from bench import precision
from bench.cache import ArtifactStore, content_key
from bench.image_sets import ImageSet


def code_hash(*objs) -> str:
    """Of the source of exactly what training runs (functions and classes, wherever they live)."""
    return hashlib.sha256("\n".join(inspect.getsource(o) for o in objs).encode()).hexdigest()[:16]


def trained_store(cache_dir: str | None) -> ArtifactStore:
    return ArtifactStore(Path(cache_dir or "results") / "trained")


def cached_train(kind: str, recipe, data: ImageSet, cache_dir: str | None, train_fn, build, code: tuple
                 ) -> tuple[nn.Module, dict]:
    """Train once: `train_fn(recipe, data)`, its checkpoint and record under <results>/trained/<hash>.safetensors,
    keyed by the recipe, the data's sha256 and the source of `code` (what training runs: data loading, the
    training function, the network), loaded into `build()` when cached."""
    key = content_key(kind, asdict(recipe), data.sha256, code_hash(*code))
    store = trained_store(cache_dir)
    if store.has(key):
        tensors, meta = store.load(key)
        model = build()
        model.load_state_dict(tensors)
        model.eval()
        record = json.loads(meta.get("record", "{}"))
        record.update({"cache": "hit", "key": key})
        return model, record
    # callers may sit inside no_grad (a task's evaluate) or a bf16 run: a suite-trained model is a base model,
    # the same for every run precision, so it trains in fp32
    with torch.enable_grad(), precision.fp32():
        model, record = train_fn(recipe, data)
    store.save(key, {k: v.contiguous() for k, v in model.state_dict().items()},
               {"record": json.dumps(record), "recipe": json.dumps(asdict(recipe)), "data_sha256": data.sha256})
    record.update({"cache": "miss", "key": key})
    return model, record
