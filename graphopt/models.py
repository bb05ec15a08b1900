"""Built-in example models, in plain PyTorch (no extra dependency), with random weights.

``gpt2`` follows GPT-2's architecture (fused qkv projection with bias, causal
attention, GELU MLP, tied-free head); ``llama`` follows Llama's (RMSNorm,
rotary embeddings, grouped-query attention, SwiGLU MLP, no biases).  Sizes are
configurable; the defaults are GPT-2-small and a small Llama.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab: int = 50257
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    max_seq: int = 1024


class GPTBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.c_attn = nn.Linear(c.d_model, 3 * c.d_model)
        self.c_proj = nn.Linear(c.d_model, c.d_model)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.proj = nn.Linear(4 * c.d_model, c.d_model)
        self.n_head = c.n_head
        self.register_buffer("causal", torch.tril(torch.ones(c.max_seq, c.max_seq, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        H = self.n_head
        q, k, v = self.c_attn(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
        att = torch.where(self.causal[:T, :T], att, torch.finfo(att.dtype).min)
        y = att.softmax(dim=-1) @ v
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab, c.d_model), nn.Embedding(c.max_seq, c.d_model)
        self.blocks = nn.ModuleList(GPTBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


@dataclass
class LlamaConfig:
    vocab: int = 32000
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 2
    d_model: int = 512
    d_ff: int = 1376
    max_seq: int = 2048
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaBlock(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        hd = c.d_model // c.n_head
        self.n_head, self.n_kv, self.hd = c.n_head, c.n_kv_head, hd
        self.norm1, self.norm2 = RMSNorm(c.d_model), RMSNorm(c.d_model)
        self.q_proj = nn.Linear(c.d_model, c.n_head * hd, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(c.n_head * hd, c.d_model, bias=False)
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, D = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        rep = self.n_head // self.n_kv
        k = k[:, :, None].expand(B, self.n_kv, rep, T, self.hd).reshape(B, self.n_head, T, self.hd)
        v = v[:, :, None].expand(B, self.n_kv, rep, T, self.hd).reshape(B, self.n_head, T, self.hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd) + mask
        y = att.softmax(dim=-1) @ v
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, D))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)
        hd = c.d_model // c.n_head
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(c.max_seq).float(), inv)
        self.register_buffer("cos", torch.cat([ang, ang], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([ang, ang], -1).sin(), persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.embed(idx)
        mask = torch.full((T, T), float("-inf"), device=idx.device).triu(1)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin, mask)
        return self.head(self.norm(x))


class Logits(nn.Module):
    """A Hugging Face causal LM as ``input_ids -> logits``, without the KV cache: one
    graph for torch.export and ONNX, and a plain tensor output for comparisons."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter, as peft's LoRA computes it:
    ``base(x) + lora_B(lora_A(x)) * scaling`` (B random here, not zero, so that the adapter
    changes the output)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: nn.Module, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             rank: int = 8) -> nn.Module:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets`` in a :class:`LoRALinear`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank))
    return model


class LoRAStack(nn.Module):
    """Token embedding, then layers of ``relu(x @ W + (x @ A) @ B * s)`` (d=512, rank 8): the
    smallest model whose best graph needs the LoRA merge ``x @ (W + s * A @ B)``."""

    def __init__(self, vocab: int = 1024, d: int = 512, layers: int = 4, rank: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LoRALinear(nn.Linear(d, d, bias=False), rank) for _ in range(layers))

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def example(name: str, seq_len: int = 128, batch: int = 1, layers: int | None = None, seed: int = 0):
    """A built-in model and example inputs: ``(model, (input_ids,))``.

    Args:
        name: ``"gpt2"`` (GPT-2-small shape), ``"llama"`` (a small Llama), ``"lora"`` (four
            LoRA-adapted linear layers) or ``"llama-lora"`` (the Llama with LoRA adapters on its
            q/k/v/o and MLP projections).
        seq_len: tokens per sequence.
        batch: sequences.
        layers: override the number of layers.
    """
    from .errors import GraphoptError
    torch.manual_seed(seed)
    if name == "gpt2":
        c = GPTConfig()
        if layers:
            c.n_layer = layers
        model, vocab, limit = GPT(c), c.vocab, c.max_seq
    elif name in ("llama", "llama-lora"):
        c = LlamaConfig()
        if layers:
            c.n_layer = layers
        model, vocab, limit = Llama(c), c.vocab, c.max_seq
        if name == "llama-lora":
            model = add_lora(model)
    elif name == "lora":
        model = LoRAStack(layers=layers or 4)
        vocab, limit = 1024, 1 << 16
    else:
        raise GraphoptError(f"unknown example model {name!r} (built-in: {', '.join(EXAMPLES)})")
    if not 1 <= seq_len <= limit:
        raise GraphoptError(f"--seq-len must be between 1 and {limit} for {name}, got {seq_len}")
    if batch < 1:
        raise GraphoptError(f"--batch must be >= 1, got {batch}")
    ids = torch.randint(0, vocab, (batch, seq_len))
    return model.eval(), (ids,)


EXAMPLES = ("gpt2", "llama", "lora", "llama-lora")
