"""WikiText-2: the GPTQ-protocol perplexity of the default model, the document split used for lm-eval,
equality with stock lm-eval, the datasets (hub) loading path exercised on local files, and the comparison with
the base model (KL divergence, top-1 agreement)."""

import math

import pytest

from bench import data, precision
from bench.errors import ConfigError
from bench.reference import Reference
from bench.tasks.wikitext import WikiText2Perplexity
from bench.tasks.wikitext_lmeval import WikiTextLmEval, wikitext_documents


def test_rows_match_the_hf_dataset_layout():
    rows = data.wikitext2_rows("test")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(data.wikitext2_rows("validation")) == 3760


def test_document_split_matches_wikitext_document_level():
    raw = data.local_file("wikitext-2-raw-v1/wiki.test.raw").read_text()
    docs = wikitext_documents(raw)
    assert len(docs) == 62
    assert docs[0].startswith(" = Robert Boulter = \n")
    assert len(wikitext_documents(data.local_file("wikitext-2-raw-v1/wiki.valid.raw").read_text())) == 60
    assert "".join(d + "\n" for d in docs).strip() == raw.strip()  # nothing lost but joins


def test_default_model_gptq_ppl_first8_in_known_range(default_model):
    # ASSETS.md: first 8 windows of the fp32-dequantized model give 19.13; bench stores base weights in fp16
    (m,) = WikiText2Perplexity(limit=8).evaluate(default_model)
    assert m.name == "wikitext2.ppl_token.gptq_s2048.first8"
    assert 18.9 < m.value < 19.4
    assert len(m.per_sample) == 8 and m.notes["n_tokens"] == 304_986  # = 148 windows of 2048 (ASSETS.md)
    assert math.isclose(math.exp(sum(m.per_sample) / 8), m.value)


def test_limit_is_in_the_metric_name():
    assert WikiText2Perplexity(limit=3, seqlen=512).metric_name == "wikitext2.ppl_token.gptq_s512.first3"
    assert WikiText2Perplexity().metric_name == "wikitext2.ppl_token.gptq_s2048"


def test_hub_loading_path_on_local_files(tmp_path):
    """The online path (`datasets.load_dataset`) run on a local dataset directory instead of the hub."""
    rows = data.wikitext2_rows("validation")
    import pandas as pd

    d = tmp_path / "wikitext_local"
    d.mkdir()
    pd.DataFrame({"text": rows}).to_parquet(d / "validation.parquet")
    loaded = data.hub_rows(str(d), None, "validation")
    assert loaded == rows


def test_lmeval_wikitext_equals_stock_lmeval(default_model, tmp_path, monkeypatch):
    """Our task's numbers equal lm-eval's own `wikitext` YAML run directly on the same documents. Two
    documents (about 8.5k tokens, 5 rolling windows of 2048) keep it to a minute; the document split itself is
    checked against lm-eval's 62 test documents above, and the model's level by the GPTQ-protocol test."""
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    task = WikiTextLmEval(max_length=2048, limit=2)
    ours = {m.name: m for m in task.evaluate(default_model)}
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=default_model.module, tokenizer=default_model.tokenizer, max_length=2048, batch_size=1)
    stock = evaluator.simple_evaluate(model=lm, tasks=[task.task_config()], limit=2, bootstrap_iters=0)
    res = stock["results"]["wikitext"]
    assert ours["wikitext2.word_ppl.lmeval_ml2048.first2"].value == pytest.approx(res["word_perplexity,none"], rel=1e-9)
    assert ours["wikitext2.byte_ppl.lmeval_ml2048.first2"].value == pytest.approx(res["byte_perplexity,none"], rel=1e-9)
    assert ours["wikitext2.bits_per_byte.lmeval_ml2048.first2"].value == pytest.approx(res["bits_per_byte,none"],
                                                                                         rel=1e-9)
    assert ours["wikitext2.word_ppl.lmeval_ml2048.first2"].notes["n_documents"] == 2
    assert 15 < ours["wikitext2.word_ppl.lmeval_ml2048.first2"].value < 60


def test_token_ids_are_cached_by_content_and_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    from conftest import byte_tokenizer

    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    tok, text = byte_tokenizer(), "\n\n".join(data.wikitext2_rows("validation")[:60])
    direct = tok(text, return_tensors="pt").input_ids
    first = data.token_ids(tok, text)
    (entry,) = (tmp_path / "data_cache" / "tokens").glob("*.npy")
    assert first.equal(direct) and data.token_ids(tok, text).equal(direct)
    assert len(list(entry.parent.glob("*.npy"))) == 1  # the second call read the entry
    assert not data.token_ids(tok, text + " more").equal(direct)  # other text, other entry
    entry.write_bytes(b"garbage")
    assert data.token_ids(tok, text).equal(direct)


# --- comparison with the base model (KL divergence, top-1 agreement) ---------------------------------------------

KL_NAMES = ("kld_vs_base", "kld_p99_vs_base", "top1_agree_vs_base")


def test_kl_names_carry_the_protocol_and_the_limit():
    assert WikiText2Perplexity()._name("kld_vs_base") == "wikitext2.kld_vs_base.gptq_s2048"
    assert WikiText2Perplexity(limit=3, seqlen=512)._name("top1_agree_vs_base") == \
        "wikitext2.top1_agree_vs_base.gptq_s512.first3"
    assert WikiText2Perplexity(split="validation")._name("kld_p99_vs_base") == \
        "wikitext2.validation.kld_p99_vs_base.gptq_s2048"
    with pytest.raises(ConfigError, match="kl_vs_base"):
        WikiText2Perplexity(kl_vs_base="yes")


def test_kl_of_the_model_against_itself_is_zero_through_forward_and_cache(default_model, tmp_path):
    """The reference is the same model: every token's KL is exactly 0 and every top-1 agrees, whether the base
    logits come from its forward (first pass, cache written) or rebuilt from the cached head input (second pass,
    bit-identical), at fp32 and bf16, each precision cached apart. Perplexity is unchanged by the comparison."""
    task = WikiText2Perplexity(limit=2, seqlen=256)
    (plain,) = task.evaluate(default_model)
    ref = Reference(default_model, tmp_path)
    for prec in ("fp32", "bf16"):
        with precision.compute(prec):
            for _ in range(2):
                ppl, *kl = task.evaluate(default_model, reference=ref)
                assert [m.name for m in kl] == [f"wikitext2.{n}.gptq_s256.first2" for n in KL_NAMES]
                kld, p99, top1 = kl
                assert kld.value == 0.0 and p99.value == 0.0 and top1.value == 1.0
                assert kld.per_sample == [0.0, 0.0] and top1.per_sample == [1.0, 1.0] and kld.ci == (0.0, 0.0)
                assert kld.notes["reference"]["precision"] == prec and kld.notes["tokens_per_window"] == 255
                if prec == "fp32":
                    assert ppl.value == plain.value and ppl.per_sample == plain.per_sample
    assert (ref.misses, ref.hits) == (4, 4)  # per precision: 2 forwards, then 2 windows from the cache
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    with precision.compute("fp32"):
        first_window = ref.key(task.token_ids(default_model)[:, :256], task.protocol_version)
        (tmp_path / f"{first_window}.safetensors").write_bytes(b"garbage")  # fails its sha256 check: rebuilt
        _, kld, _, _ = task.evaluate(default_model, reference=ref)
    assert kld.value == 0.0 and (ref.misses, ref.hits) == (5, 5)


def test_kl_against_rtn_w3_matches_torch_on_the_same_logits(default_model):
    """The default model against its RTN W3 g128 copy (real weights, real text): KL > 0, and the task's values
    equal an independent float64 computation with torch on both models' logits."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from bench import models
    from bench.budget import Budget
    from bench.methods.rtn import RTN

    rtn = models.with_module(default_model, RTN(bits=3, group_size=128).compress(
        models.clone(default_model), None, Budget(name="t")).model)
    task = WikiText2Perplexity(limit=3, seqlen=256)
    ppl, kld, p99, top1 = task.evaluate(rtn, reference=Reference(default_model))
    ids = task.token_ids(rtn)
    token_kl, agree = [], []
    with torch.no_grad():
        for i in range(3):
            batch = ids[:, i * 256:(i + 1) * 256]
            lb = F.log_softmax(default_model.module(batch).logits[0, :-1].double(), -1)
            lq = F.log_softmax(rtn.module(batch).logits[0, :-1].double(), -1)
            token_kl.append(F.kl_div(lq, lb, reduction="none", log_target=True).sum(-1).numpy())
            agree.append((lb.argmax(-1) == lq.argmax(-1)).double().mean().item())
    token_kl = np.stack(token_kl)
    assert kld.value == pytest.approx(token_kl.mean(), rel=1e-5)
    assert kld.per_sample == pytest.approx(token_kl.mean(axis=1).tolist(), rel=1e-5)
    assert p99.value == pytest.approx(np.quantile(token_kl, 0.99), rel=1e-4)
    assert top1.value == pytest.approx(np.mean(agree), abs=1e-12) and top1.per_sample == pytest.approx(agree)
    # W3 RTN of this small (already 4-bit) model is heavy damage: far from the base, many top-1 tokens change
    assert 0.3 < kld.value < 5 and kld.value < p99.value < 20 and 0.2 < top1.value < 0.9
    assert kld.ci[0] < kld.value < kld.ci[1] and kld.stderr > 0
    assert p99.ci[0] <= p99.value <= p99.ci[1] and top1.ci[0] <= top1.value <= top1.ci[1]
    assert p99.notes["percentiles"]["p50"] < kld.value < p99.notes["percentiles"]["max"]
    assert kld.direction == p99.direction == "lower" and top1.direction == "higher"
    assert ppl.value > 19


def test_reference_is_not_cached_when_the_logits_are_not_the_heads_output(tiny_llama, tmp_path):
    """A model that changes its logits after the head (here: doubled, like a soft-cap would) cannot be rebuilt from
    the head's input, so nothing is cached and its forward runs for every window."""
    import torch

    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    ref = Reference(tiny_llama, tmp_path)
    assert torch.equal(ref.logits(ids, "p"), ref.logits(ids, "p")) and ref.hits == 1 and ref.cacheable
    tiny_llama.module.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out.logits * 2) or out)
    other = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    doubled = ref.logits(other, "p")
    assert not ref.cacheable and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(ref.logits(other, "p"), doubled) and ref.hits == 1


def test_runs_record_kl_against_the_base_model_they_loaded(store_results_dir, tiny_byte_llama_dir, small_wikitext):
    """Through the Runner: the baseline cell records no comparison (it is the reference) but its evaluation fills
    the reference cache, with the same perplexity as its own forward gives; a compressed cell then records the
    three comparisons with their intervals and directions from that cache, without a base forward; another
    precision caches its own."""
    from conftest import run_tiny

    def run(*overrides):
        return run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "task.limit=2", *overrides)

    names = [f"wikitext2.{n}.gptq_s64.first2" for n in KL_NAMES]
    ppl = "wikitext2.ppl_token.gptq_s64.first2"
    base = run("method=none")
    assert ppl in base.metrics and not any(n in base.metrics for n in names)
    assert base.metrics[ppl] == run("method=none", "task.kl_vs_base=false").metrics[ppl]  # same forward
    cache = store_results_dir / "data_cache" / "reference"
    written = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(written) == 2  # one per window, by the baseline's evaluation
    rtn = run("method=rtn", "method.bits=3", "method.group_size=32")
    kld, p99, top1 = (rtn.metrics[n] for n in names)
    assert 0 < kld < p99 and 0 <= top1 <= 1
    for n in names:
        assert rtn.metrics[f"{n}.ci95_low"] <= rtn.metrics[n] <= rtn.metrics[f"{n}.ci95_high"]
        assert f"{n}.stderr" in rtn.metrics
    assert [rtn.tags[f"metric.{n}.direction"] for n in names] == ["lower", "lower", "higher"]
    assert rtn.tags["bench.primary_metric"] == ppl
    sign = run("method=sign")
    assert sign.metrics[names[0]] > 0
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == written  # read, not rewritten
    fp32 = run("method=rtn", "method.bits=3", "method.group_size=32", "precision=fp32")
    assert fp32.metrics[names[0]] > 0 and len(list(cache.glob("*.safetensors"))) == 4
