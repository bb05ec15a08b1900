"""Hugging Face GPT-2 and Llama (small configs, random weights, nothing downloaded),
optimized through both capture paths: same outputs; Llama's projections merged; every
attention block (HF's eager attention, causal mask built from the sequence length) fused into
SDPA with is_causal, and Llama's grouped-query repeat_kv folded into enable_gqa."""
import pytest
import torch

import graphopt
from graphopt.models import Logits

transformers = pytest.importorskip("transformers")



def _build(name):
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                       attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    return Logits(model.eval())


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_model_same_outputs(name, capture):
    model = _build(name)
    ids = torch.randint(0, 128, (2, 16))
    fast = graphopt.optimize(model, (ids,), capture=capture, time_limit=20)
    assert not fast.report.fallbacks, fast.report
    attention = fast.report.attention
    assert attention["blocks"] == attention["fused"] == 2, fast.report   # 2 layers
    assert attention["causal"] == 2 and attention["masked"] == 0, fast.report
    assert attention["gqa"] == (2 if name == "llama" else 0), fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)
        other = torch.randint(0, 128, (2, 16))
        torch.testing.assert_close(fast(other), model(other), rtol=1e-5, atol=1e-5)
    if name == "llama":
        merged = [k for k, v in fast.report.to_json()["rewrites"].items() if "concat" in v]
        assert sum(fast.report.applied[k] for k in merged) >= 6  # q/k/v and gate/up, 2 layers


# other decoder families users bring: their own attention code, the same forms underneath
FAMILIES = {
    "qwen2": {"num_key_value_heads": 2},
    "gemma": {"num_key_value_heads": 2, "head_dim": 16},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_decoder_families_fuse_every_block(family):
    kw = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg = transformers.AutoConfig.for_model(family, **kw, **FAMILIES[family])
    torch.manual_seed(0)
    model = Logits(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval())
    ids = torch.randint(0, 128, (2, 16))
    fast = graphopt.optimize(model, (ids,), time_limit=20)
    att = fast.report.attention
    assert not fast.report.fallbacks and att["blocks"] == att["fused"] == att["causal"] == 2, fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bf16_model_fuses_every_block(name):
    """bf16 Llama casts to float32 around RMSNorm and the rotary embedding: those casts are
    real (not aliases) and stay; attention and its fp32 softmax upcast still fuse."""
    model = _build(name).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 19))
    fast = graphopt.optimize(model, (ids,), time_limit=20)
    att = fast.report.attention
    assert not fast.report.fallbacks and att["blocks"] == att["fused"] == att["causal"] == 2, fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).float(), model(ids).float(), rtol=2e-2, atol=2e-2)
