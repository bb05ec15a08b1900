"""Greedy generation with Hugging Face GPT-2 (small config, random weights, nothing downloaded)
whose forward goes through ``torch.compile(backend="graphopt")``: the same tokens as eager, and the
same logits at every step (a small numeric error rarely changes a tiny random model's argmax), with
a static and with the default dynamic KV cache, and the attention of the captured graphs fused
into SDPA."""
import pytest
import torch

from graphopt.optimize import LAST_REPORTS

transformers = pytest.importorskip("transformers")

PROMPT_LEN, NEW_TOKENS = 8, 12
LOGITS_TOL = dict(rtol=1e-5, atol=1e-6)   # float32: SDPA sums in another order (about 1e-7 here)


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=128,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _generate(model, ids, cache_implementation):
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids),   # no padding; silences HF's warning
                  output_logits=True, return_dict_in_generate=True)
    if cache_implementation is not None:
        kwargs["cache_implementation"] = cache_implementation
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def _eager_and_compiled(cache_implementation):
    """(eager output, graphopt output, reports of the graphs compiled while generating); each
    output has ``.sequences`` (the tokens) and ``.logits`` (one tensor per generated token)."""
    model = _model()
    ids = torch.randint(1, 128, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    expected = _generate(model, ids, cache_implementation)
    torch._dynamo.reset()
    LAST_REPORTS.clear()
    try:
        model.forward = torch.compile(model.forward, backend="graphopt")
        got = _generate(model, ids, cache_implementation)
        reports = list(LAST_REPORTS)
    finally:
        torch._dynamo.reset()
    return expected, got, reports


def _assert_same_generation(got, expected):
    """The same tokens, and the same logits at every step."""
    assert expected.sequences.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, **LOGITS_TOL, msg=lambda m, step=step: f"step {step}: {m}")


def test_greedy_generation_with_static_cache():
    expected, got, reports = _eager_and_compiled("static")
    _assert_same_generation(got, expected)
    assert len(reports) >= 2, reports   # prefill and the decode step
    for report in reports:
        assert not report.fallbacks, report
        assert report.attention["blocks"] == report.attention["fused"] == 2, report


def test_greedy_generation_with_dynamic_cache():
    expected, got, reports = _eager_and_compiled(None)
    _assert_same_generation(got, expected)
    assert reports, "nothing was compiled"
    prefill = reports[0]
    assert not prefill.fallbacks, prefill
    assert prefill.attention["blocks"] == prefill.attention["fused"] == 2, prefill
    assert prefill.attention["causal"] == 2, prefill
    # the later decode graphs have symbolic lengths: fused too (one query sees every cached
    # key: no mask), written back in an order that keeps the cache update before its reads
    assert len(reports) >= 3 and all(not r.fallbacks for r in reports), [r.fallbacks for r in reports]
    for report in reports:
        assert report.attention["blocks"] == report.attention["fused"] == 2, report
