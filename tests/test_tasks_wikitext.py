"""WikiText-2: the GPTQ-protocol perplexity of the default model, the document split used for lm-eval,
equality with stock lm-eval, and the datasets (hub) loading path exercised on local files."""

import math

import pytest

from bench import data
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
