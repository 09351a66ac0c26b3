"""bench.py: warm versus cold compile, vcompile against stock torch.compile and eager.

The model here, a small decoder, is also what test_vcompile.py compiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# The splitting op: attention as an opaque custom op, as vLLM's attention
# backends are. Inductor never sees inside it.
@torch.library.custom_op("vcompile_bench::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Causal self-attention over one sequence; q, k, v are (tokens, hidden)."""
    tokens, hidden = q.shape
    q, k, v = (t.reshape(tokens, num_heads, hidden // num_heads).transpose(0, 1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(0, 1).reshape(tokens, hidden)


@attention.register_fake
def _(q, k, v, num_heads):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.num_heads = heads
        self.input_norm = RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.post_norm = RMSNorm(hidden)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.input_norm(x)).chunk(3, dim=-1)
        x = x + self.o_proj(torch.ops.vcompile_bench.attention(q, k, v, self.num_heads))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    """Token ids (tokens,) in, hidden states (tokens, hidden) out."""

    def __init__(self, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(hidden)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


SPLITTING_OPS = ["vcompile_bench::attention"]
