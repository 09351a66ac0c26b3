# SPDX-License-Identifier: Apache-2.0
# Copyright 2026 The vcompile authors
"""bench.py: warm versus cold compile, vcompile against stock torch.compile and eager.

    python bench.py                       # the first look: the headline cases at 2 and 32 layers (~2 min on 2 CPU cores)
    python bench.py --full                # every case at 2, 8 and 32 layers, three runs each (~17 min on 2 CPU cores)
    python bench.py --json out.json --plot out.png
    python bench.py --model hf-llama      # the same cases on a Hugging Face Llama (needs transformers)
    python bench.py --generate            # decode speed: greedy tokens with a key/value cache
    python bench.py --generate --model hf-llama   # through transformers' generate(), stock as its static-cache recipe
    python bench.py --startup             # start-up: about 1 GB of weights on disk, with and without prepare()
    python bench.py --passes              # a graph pass: opaque norms and activation decomposed, with against without
    python bench.py --cudagraphs          # decode steps with piecewise CUDA graphs (needs CUDA)

Every case runs in a fresh Python process with its own empty caches where it
is cold, so what it measures is what a new server process pays:

  eager                     the model as written
  stock cold / warm         torch.compile(fullgraph=True), token dim dynamic, with
                            an empty then a filled TORCHINDUCTOR_CACHE_DIR
  vcompile cold             vcompile.compile(...), empty cache root
  vcompile warm             AOT load with codegen (the default)
  (--full adds)
  vcompile cold, 4 at once  four such processes started together on one empty root
  vcompile cold/warm, size  the same with a compile size, an entry of its own
  vcompile warm no-codegen  AOT load of the pickled split graph (before vLLM PR 40151)
  vcompile warm JIT         Dynamo traces, every piece is loaded from the cache
  vcompile warm read-only   the AOT load from the same cache root, mounted read-only

For each: time to first output from process start (imports shown apart),
and the steady-state time per forward (median of many calls, synchronized
on GPU). The small decoder below is also what test_vcompile.py compiles.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import datetime
import functools
import glob
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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

    def forward(self, x, positions=None):
        q, k, v = self.qkv(self.input_norm(x)).chunk(3, dim=-1)
        x = x + self.o_proj(self.attention(q, k, v, positions))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def attention(self, q, k, v, positions):
        return torch.ops.vcompile_bench.attention(q, k, v, self.num_heads)


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


# --- a Hugging Face model, compiled as vLLM compiles it -------------------------
# transformers looks a model's attention up by name in AttentionInterface.
# Registered under "vcompile", attention becomes a call of the custom op below,
# the splitting op: everything between two attention calls compiles.


@torch.library.custom_op("vcompile_hf::attention", mutates_args=())
def hf_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention on (batch, heads, tokens, head_dim); k and v may have
    fewer heads. Returns (batch, tokens, heads, head_dim), contiguous, the
    layout transformers wants next. The transpose is done here, not in the
    traced code: there `.contiguous()` of a transposed tensor asks whether the
    token count is 1 (a size-1 dim is contiguous either way), and Dynamo
    writes that down as a size guard, `size != 1`, which vcompile keeps."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


@hf_attention_op.register_fake
def _(q, k, v, scale):
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty(batch, tokens, heads, head_dim)


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface's signature. Whole causal sequences only: no padding
    mask, no key/value cache (the op is causal by itself)."""
    return torch.ops.vcompile_hf.attention(query, key, value, scaling), None


HF_SPLITTING_OPS = ["vcompile_hf::attention"]
HF_MODELS = {"llama": ("LlamaConfig", "LlamaModel", {}),
             "qwen2": ("Qwen2Config", "Qwen2Model", {"use_sliding_window": False}),
             "mistral": ("MistralConfig", "MistralModel", {"sliding_window": None})}


def hf_config(name: str, attention: str, layers: int, hidden: int, heads: int, ffn: int, vocab: int, **overrides):
    """A config of HF_MODELS[name], half as many key/value heads as query
    heads, whose attention is the function registered as `attention`."""
    import transformers

    config_name, _, extra = HF_MODELS[name]
    return getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), attn_implementation=attention,
        **extra, **overrides)


def hf_model(name: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128,
             vocab: int = 256) -> nn.Module:
    """A small Hugging Face decoder with random weights, built from its config
    (nothing downloaded). Input ids (1, tokens); output a ModelOutput."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register("vcompile", hf_attention)
    AttentionMaskInterface.register("vcompile", lambda *args, **kwargs: None)  # no mask tensor to build
    config = hf_config(name, "vcompile", layers, hidden, heads, ffn, vocab, max_position_embeddings=4096,
                       use_cache=False)
    return getattr(transformers, HF_MODELS[name][1])(config).eval()


# --- generating text: a key/value cache behind the splitting op ----------------
# What a compiled decoder is for at serving time: one prefill of the prompt,
# then one token at a time. As in vLLM, the key/value cache lives outside the
# compiled graph, inside the attention op: each attention layer owns cache
# tensors, and the op writes this step's keys and values into them at the
# token positions and attends over everything written so far. The op is the
# splitting op, so the compiled pieces around it never see the cache; to
# vcompile a step is a call with input ids and positions whose token
# dimension is dynamic, 1 when decoding.


@torch.library.custom_op("vcompile_kv::attention", mutates_args=("k_cache", "v_cache"))
def kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q (tokens, heads, head_dim), k and v (tokens, kv_heads, head_dim),
    caches (max_tokens, kv_heads, head_dim), positions (tokens,). Writes k and
    v at `positions`, then each query attends to every position up to its own."""
    k_cache[positions] = k
    v_cache[positions] = v
    seen = int(positions.max()) + 1  # a later, longer sequence's leftovers beyond this are never read
    mask = torch.arange(seen, device=q.device) <= positions[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k_cache[:seen].transpose(0, 1),
                                         v_cache[:seen].transpose(0, 1), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(0, 1).contiguous()


@kv_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


KV_SPLITTING_OPS = ["vcompile_kv::attention"]


def add_kv_cache(module: nn.Module, max_tokens: int, kv_heads: int, head_dim: int) -> None:
    """Gives an attention layer its own cache, preallocated for max_tokens
    positions. Buffers, not parameters: read from the model at every call,
    like the weights, and not saved in a state dict."""
    for name in ("k_cache", "v_cache"):
        module.register_buffer(name, torch.zeros(max_tokens, kv_heads, head_dim), persistent=False)


class CachedDecoderLayer(DecoderLayer):
    def __init__(self, hidden: int, heads: int, ffn: int, max_tokens: int):
        super().__init__(hidden, heads, ffn)
        add_kv_cache(self, max_tokens, heads, hidden // heads)

    def attention(self, q, k, v, positions):
        tokens, hidden = q.shape
        q, k, v = (t.view(tokens, self.num_heads, hidden // self.num_heads) for t in (q, k, v))
        out = torch.ops.vcompile_kv.attention(q, k, v, self.k_cache, self.v_cache, positions,
                                              (hidden // self.num_heads) ** -0.5)
        return out.view(tokens, hidden)


class CachedDecoder(Decoder):
    """Decoder with a key/value cache in every layer, and a language-model
    head. input_ids and position_ids (tokens,) in, logits (tokens, vocab) out."""

    def __init__(self, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 256,
                 max_tokens: int = 256):
        super().__init__(layers, hidden, heads, ffn, vocab)
        self.layers = nn.ModuleList(CachedDecoderLayer(hidden, heads, ffn, max_tokens) for _ in range(layers))
        # Not tied to the embedding: with random weights a tied head picks the
        # input token again at every step, and a test of decoding would compare
        # runs of one repeated token.
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids)
        return self.lm_head(self.norm(x))


# --- decoders written the way people write them --------------------------------
# Layout work in traced code: GPT-2 ports reshape slices of one qkv matmul,
# nanoGPT and gpt-fast view to (batch, tokens, heads, head_dim), transpose,
# and after attention call .contiguous() before a view. Each of those asks
# whether a stride matters at the size traced, the questions that made a
# traced graph refuse one token. The attention op below takes nanoGPT's
# (batch, heads, tokens, head_dim) layout.


@torch.library.custom_op("vcompile_kv::attention_bhsd", mutates_args=("k_cache", "v_cache"))
def kv_attention_bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """kv_attention for q, k, v of (1, heads, tokens, head_dim)."""
    out = kv_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), k_cache, v_cache,
                       positions, scale)
    return out.transpose(0, 1)[None].contiguous()


@kv_attention_bhsd.register_fake
def _(q, k, v, k_cache, v_cache, positions, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def kv_splitting_ops(model: nn.Module) -> list[str]:
    """The attention op a cached model calls: vcompile warns of a splitting op the traced graph never calls."""
    bhsd = isinstance(model, StyleDecoder) and model.style != "gpt2"
    return ["vcompile_kv::attention_bhsd"] if bhsd else KV_SPLITTING_OPS


class GPT2Block(nn.Module):
    """Input (tokens, hidden), as vLLM's GPT-2 takes it."""

    def __init__(self, d: int, heads: int, max_tokens: int):
        super().__init__()
        self.d, self.heads = d, heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        add_kv_cache(self, max_tokens, heads, d // heads)

    def forward(self, x, positions):
        t, d = x.shape
        q, k, v = (z.reshape(t, self.heads, d // self.heads) for z in self.qkv(self.ln1(x)).split(d, -1))
        y = torch.ops.vcompile_kv.attention(q, k, v, self.k_cache, self.v_cache, positions, (d // self.heads) ** -0.5)
        x = x + self.proj(y.reshape(t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class NanoGPTBlock(nn.Module):
    """nanoGPT's CausalSelfAttention and MLP; input (1, tokens, hidden)."""

    def __init__(self, d: int, heads: int, max_tokens: int):
        super().__init__()
        self.n_embd, self.n_head = d, heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        add_kv_cache(self, max_tokens, heads, d // heads)

    def forward(self, x, positions):
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = torch.ops.vcompile_kv.attention_bhsd(q, k, v, self.k_cache, self.v_cache, positions[0],
                                                 1.0 / (k.size(-1) ** 0.5))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPTFastBlock(nn.Module):
    """gpt-fast's Attention and FeedForward; input (1, tokens, hidden)."""

    def __init__(self, d: int, heads: int, max_tokens: int):
        super().__init__()
        self.dim, self.n_head, self.head_dim = d, heads, d // heads
        self.attention_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
        self.wqkv, self.wo = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.w1, self.w3 = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.w2 = nn.Linear(2 * d, d, bias=False)
        add_kv_cache(self, max_tokens, heads, d // heads)

    def forward(self, x, positions):
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).split([self.dim, self.dim, self.dim], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_head, self.head_dim)
        v = v.view(bsz, seqlen, self.n_head, self.head_dim)
        q, k, v = map(lambda x: x.transpose(1, 2), (q, k, v))
        y = torch.ops.vcompile_kv.attention_bhsd(q, k, v, self.k_cache, self.v_cache, positions[0],
                                                 self.head_dim ** -0.5)
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        h = x + self.wo(y)
        return h + self.w2(F.silu(self.w1(self.ffn_norm(h))) * self.w3(self.ffn_norm(h)))


STYLE_BLOCKS = {"gpt2": GPT2Block, "nanogpt": NanoGPTBlock, "gpt-fast": GPTFastBlock}


class StyleDecoder(nn.Module):
    """A language model of STYLE_BLOCKS[style] layers: input_ids and
    position_ids (tokens,) for gpt2, (1, tokens) for the others; logits out."""

    def __init__(self, style: str, layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 256,
                 max_tokens: int = 256):
        super().__init__()
        self.style = style
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(max_tokens, hidden)
        self.h = nn.ModuleList(STYLE_BLOCKS[style](hidden, heads, max_tokens) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, position_ids):
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            x = block(x, position_ids)
        return self.lm_head(self.ln_f(x))



# --- a tensor-parallel decoder, sharded the Megatron way -----------------------
# Each rank holds a slice of every layer: the qkv and gate/up projections by
# output columns (whole heads, whole ffn units), the output and down
# projections by input rows, each followed by an all-reduce of the partial
# sums. Embedding and norms are replicated. The sharding is the model's
# business; vcompile sees one graph per rank, with the all-reduce in it.


@torch.library.custom_op("vcompile_tp::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, through torch.distributed, as vLLM's all-reduce
    op is: an opaque call in the graph, compiled around."""
    out = x.clone()
    torch.distributed.all_reduce(out)
    return out


@all_reduce.register_fake
def _(x):
    return torch.empty_like(x)


def functional_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The same sum with torch's functional collective, which Dynamo traces
    into the graph (all_reduce, then wait_tensor)."""
    from torch.distributed import _functional_collectives as funcol
    return funcol.all_reduce(x, "sum", torch.distributed.group.WORLD)


ALL_REDUCES = {"custom_op": lambda x: torch.ops.vcompile_tp.all_reduce(x), "functional": functional_all_reduce}


class ShardedDecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, world: int, reduce: str):
        super().__init__()
        self.num_heads, self.reduce = heads // world, ALL_REDUCES[reduce]
        self.input_norm = RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden // world, bias=False)
        self.o_proj = nn.Linear(hidden // world, hidden, bias=False)
        self.post_norm = RMSNorm(hidden)
        self.gate_up = nn.Linear(hidden, 2 * ffn // world, bias=False)
        self.down = nn.Linear(ffn // world, hidden, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.input_norm(x)).chunk(3, dim=-1)
        x = x + self.reduce(self.o_proj(torch.ops.vcompile_bench.attention(q, k, v, self.num_heads)))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.reduce(self.down(F.silu(gate) * up))


class ShardedDecoder(Decoder):
    """Decoder's rank `rank` of `world`; reduce: a key of ALL_REDUCES."""

    def __init__(self, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 256,
                 world: int = 2, reduce: str = "custom_op"):
        super().__init__(0, hidden, heads, ffn, vocab)
        self.layers = nn.ModuleList(ShardedDecoderLayer(hidden, heads, ffn, world, reduce) for _ in range(layers))


def shard(full: Decoder, rank: int, world: int, reduce: str = "custom_op") -> ShardedDecoder:
    """Rank `rank`'s slice of a Decoder: run on every rank and summed by the
    all-reduces, it computes what the unsharded model computes."""
    first = full.layers[0]
    hidden, ffn = first.o_proj.in_features, first.down.in_features
    sharded = ShardedDecoder(len(full.layers), hidden, first.num_heads, ffn, full.embed.num_embeddings,
                             world, reduce)

    def rows(weight, parts):  # this rank's slice of each of `parts` stacked blocks of output rows
        return torch.cat([block.chunk(world)[rank] for block in weight.chunk(parts)])

    with torch.no_grad():
        sharded.embed.weight.copy_(full.embed.weight)
        sharded.norm.weight.copy_(full.norm.weight)
        for mine, theirs in zip(sharded.layers, full.layers):
            mine.input_norm.weight.copy_(theirs.input_norm.weight)
            mine.post_norm.weight.copy_(theirs.post_norm.weight)
            mine.qkv.weight.copy_(rows(theirs.qkv.weight, 3))
            mine.gate_up.weight.copy_(rows(theirs.gate_up.weight, 2))
            mine.o_proj.weight.copy_(theirs.o_proj.weight.chunk(world, dim=1)[rank])
            mine.down.weight.copy_(theirs.down.weight.chunk(world, dim=1)[rank])
    return sharded.to(full.embed.weight.device)


def hf_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                    **kwargs):
    """AttentionInterface's signature, batch 1: the layer's own cache, at the
    positions transformers passes down from the model's position_ids."""
    out = torch.ops.vcompile_kv.attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                                          value[0].transpose(0, 1), module.k_cache, module.v_cache,
                                          position_ids[0], scaling)
    return out[None], None  # (batch, tokens, heads, head_dim), as transformers wants


def hf_cached_model(name: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128,
                    vocab: int = 256, max_tokens: int = 256) -> nn.Module:
    """A small Hugging Face causal LM (logits out) whose attention layers
    each own a key/value cache. input_ids and position_ids (1, tokens) in."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register("vcompile_kv", hf_kv_attention)
    AttentionMaskInterface.register("vcompile_kv", lambda *args, **kwargs: None)  # the op masks by position
    config = hf_config(name, "vcompile_kv", layers, hidden, heads, ffn, vocab, max_position_embeddings=4096,
                       use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for layer in model.model.layers:
        add_kv_cache(layer.self_attn, max_tokens, config.num_key_value_heads, hidden // heads)
    return model


def generate(fn, model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding: one prefill call over the prompt, then one call per
    token, positions counted from 0 (a new prompt overwrites the cache). `fn`
    is the model or a compiled model. Returns the new token ids and the
    logits each step chose from."""
    cache_size = next(b.shape[0] for name, b in model.named_buffers() if name.endswith("k_cache"))
    if prompt_ids.shape[-1] + new_tokens > cache_size:
        raise ValueError(f"{prompt_ids.shape[-1]} prompt tokens and {new_tokens} new ones do not fit a "
                         f"key/value cache of {cache_size} positions")
    batched = prompt_ids.dim() == 2  # Hugging Face models take (1, tokens)
    ids, positions = prompt_ids, torch.arange(prompt_ids.shape[-1], device=prompt_ids.device)
    tokens, steps = [], []
    for _ in range(new_tokens):
        out = fn(input_ids=ids, position_ids=positions[None] if batched else positions)
        logits = getattr(out, "logits", out)  # a Hugging Face ModelOutput, or the logits
        logits = (logits[0] if batched else logits)[-1]
        token = logits.argmax()
        tokens.append(token)
        steps.append(logits)
        ids, positions = token.view(1, 1) if batched else token.view(1), positions[-1:] + 1
    return torch.stack(tokens), torch.stack(steps)


def hidden_states(out) -> torch.Tensor:
    """The hidden states, whether a model returns a tensor or a ModelOutput."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


# --- transformers' generate() through vcompile ----------------------------------
# generate() calls the model once over the prompt, then once per new token,
# handing it a DynamicCache to fill. The recipe keeps that cache's job where
# vLLM keeps it, outside the compiled graph: the keys and values live in the
# attention op, the splitting op (each layer's buffers, a row per sequence);
# the positions are the caller's, counted from the DynamicCache's length,
# which the step keeps up to date with one number per position. The batch is
# flattened into the token dimension, vLLM's one dynamic dimension, so a batch
# of two and a batch of one run the same compiled code: rows of equal length.


def hf_cached_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q (1, heads, tokens, head_dim), k and v (1, kv_heads, tokens, head_dim):
    rows of equal length, one after another, each at positions[:length].
    Caches (max_rows, kv_heads, max_tokens, head_dim). Writes each row's k and
    v into its cache row, attends each query to its row's positions up to its
    own. Returns (1, tokens, heads, head_dim)."""
    start, end = int(positions[0]), int(positions[-1]) + 1
    rows, length = q.shape[2] // (end - start), end - start
    q, k, v = (t[0].unflatten(1, (rows, length)).transpose(0, 1) for t in (q, k, v))  # (rows, heads, length, dim)
    k_cache[:rows, :, start:end] = k
    v_cache[:rows, :, start:end] = v
    # One token, the last position, attends to every position: no mask to build (6 us a layer on CPU).
    mask = None if length == 1 else torch.arange(end, device=q.device) <= positions[:length, None]
    out = F.scaled_dot_product_attention(q, k_cache[:rows, :, :end], v_cache[:rows, :, :end], attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2).flatten(0, 1)[None]


# Registered as vLLM's direct_register_custom_op registers its attention:
# torch.library.custom_op's Python dispatch (autograd, mutation and aliasing
# checks) cost 60 to 100 us a call here, more than this op's own work at a
# decode step, once per layer per token (CPU, torch 2.13).
_hf_library = torch.library.Library("vcompile_hf", "FRAGMENT")
_hf_library.define("cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                   "Tensor positions, float scale) -> Tensor")
_hf_library.impl("cached_attention", hf_cached_attention_op, "CompositeExplicitAutograd")


@torch.library.register_fake("vcompile_hf::cached_attention")
def _(q, k, v, k_cache, v_cache, positions, scale):
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty(batch, tokens, heads, head_dim)


def hf_cached_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                        **kwargs):
    """AttentionInterface's signature: the layer's own cache rows."""
    return torch.ops.vcompile_hf.cached_attention(query, key, value, module.k_cache, module.v_cache,
                                                  position_ids[0], scaling), None


HF_GENERATE_SPLITTING_OPS = ["vcompile_hf::cached_attention"]
# What compiled generation is sized for: the most sequences at once, and
# positions per sequence. A prefill of every row is one call.
GENERATE_ROWS, GENERATE_POSITIONS = 2, 128


def hf_generation_pair(name: str = "llama", layers: int = 2, cache_dir: str | None = None, hidden: int = 64,
                       heads: int = 4, ffn: int = 128, vocab: int = 256, config: dict | None = None):
    """Two Hugging Face causal LMs with the same random weights: the first's
    generate() runs through vcompile (its cache under cache_dir), the second
    is transformers' own, eager, with its DynamicCache."""
    import transformers
    import vcompile
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register("vcompile_generate", hf_cached_attention)
    AttentionMaskInterface.register("vcompile_generate", lambda *args, **kwargs: None)  # the op masks by position
    model, eager = (transformers.AutoModelForCausalLM.from_config(hf_config(name, attention, layers, hidden, heads,
                                                                             ffn, vocab)).eval()
                    for attention in ("vcompile_generate", "sdpa"))
    eager.load_state_dict(model.state_dict())
    for layer in model.model.layers:
        for cache in ("k_cache", "v_cache"):
            layer.self_attn.register_buffer(cache, torch.zeros(GENERATE_ROWS, model.config.num_key_value_heads,
                                                               GENERATE_POSITIONS, hidden // heads),
                                            persistent=False)
    cfg = vcompile.CompilationConfig(splitting_ops=HF_GENERATE_SPLITTING_OPS, cache_dir=cache_dir,
                                     max_num_batched_tokens=GENERATE_ROWS * GENERATE_POSITIONS, **(config or {}))
    compiled = vcompile.compile(model, cfg, dynamic_arg_dims={"input_ids": 1, "position_ids": 1})
    # What generate() calls, as transformers' own recipe sets a compiled
    # forward on the instance; vcompile compiles the class's forward.
    model.forward = functools.partial(generation_step, compiled)
    model.generate = functools.partial(checked_generate, model)
    return model, eager


def generation_step(compiled, input_ids: torch.Tensor, past_key_values=None, attention_mask=None,
                    use_cache: bool = True, return_dict: bool = True, **unused):
    """One call of generate()'s loop: the new tokens of every row, at the
    positions after what the DynamicCache holds. Whatever it cannot honour is
    refused at the prompt's call, before any token; use_cache and return_dict,
    which generate() always passes, change nothing."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if unused:  # output_hidden_states, inputs_embeds, position_ids, ...: not in the compiled call
        raise ValueError(f"vcompile's generate() recipe does not use {', '.join(sorted(unused))}")
    if past_key_values is not None and type(past_key_values) is not DynamicCache:
        raise ValueError(f"vcompile's generate() recipe keeps keys and values in the attention op and counts "
                         f"positions with a DynamicCache, not a {type(past_key_values).__name__}: leave out "
                         "cache_implementation and past_key_values")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("vcompile's generate() recipe runs rows of equal length: an attention_mask with zeros "
                         "(a padded batch) is not supported; generate each prompt length apart")
    rows, length = input_ids.shape
    start = past_key_values.get_seq_length() if past_key_values is not None else 0
    if rows > GENERATE_ROWS or start + length > GENERATE_POSITIONS:
        raise ValueError(f"{rows} rows at positions {start} to {start + length - 1} do not fit the key/value "
                         f"cache of {GENERATE_ROWS} rows of {GENERATE_POSITIONS} positions")
    positions = torch.arange(start, start + length, device=input_ids.device).repeat(rows)
    logits = compiled(input_ids=input_ids.reshape(1, -1), position_ids=positions[None], use_cache=False).logits
    if past_key_values is not None:  # its length, as one number a position: the keys and values are in the op
        past_key_values.update(*[logits.new_zeros(rows, 1, length, 1)] * 2, layer_idx=0)
    return CausalLMOutputWithPast(logits=logits.view(rows, length, -1), past_key_values=past_key_values)


def checked_generate(model, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
    """transformers' generate(), after what it would do wrong is refused, before any token."""
    from transformers import GenerationMixin
    from transformers.generation import GenerationMode

    settings = copy.deepcopy(generation_config or model.generation_config)
    unused = settings.update(**kwargs)
    mode = settings.get_generation_mode(unused.get("assistant_model"))
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"vcompile's generate() recipe runs greedy search and sampling, not {mode.value}: "
                         "generate() cannot reorder or roll back the keys and values in the attention op")
    ids = inputs if inputs is not None else unused.get("input_ids")
    if ids is not None:
        new = settings.max_new_tokens if settings.max_new_tokens is not None else settings.max_length - ids.shape[-1]
        if ids.shape[-1] + new > GENERATE_POSITIONS:
            raise ValueError(f"{ids.shape[-1]} prompt tokens and {new} new ones do not fit the key/value cache "
                             f"of {GENERATE_POSITIONS} positions")
    return GenerationMixin.generate(model, inputs, generation_config, **kwargs)


# --- the bench --------------------------------------------------------------

MODEL = dict(hidden=256, heads=4, ffn=512, vocab=1024)
# vLLM's defaults: no compile size, one range up to the token budget. A
# compile size is an Inductor compile of every piece more, so it is a case of
# its own (SIZE_CASES), with the size the first output is not at.
CONFIG = dict(max_num_batched_tokens=256)
SIZE_CONFIG = dict(CONFIG, compile_sizes=[8])
FIRST_SIZE, STEADY_SIZE = 64, 128

# Report order. A setup case runs before the case that needs it and is
# reported too, but is not a headline.
HEADLINE = ["eager", "stock_cold", "stock_warm", "vcompile_cold", "vcompile_warm"]
SIZE_CASES = ["vcompile_cold_size", "vcompile_warm_size"]
CASES = ["eager", "stock_cold", "stock_warm", "vcompile_cold", "vcompile_cold_x4", "vcompile_warm", "vcompile_warm_ro",
         "vcompile_warm_parts", "vcompile_cold_nocodegen", "vcompile_warm_nocodegen", "vcompile_cold_jit",
         "vcompile_warm_jit", *SIZE_CASES]
# With --full the headline cases run three times (fresh processes each), and
# each number is the median of the three: on a shared machine a process
# start varies by tenths of a second, and its speed by several percent.
REPEATED = {"eager", "stock_cold", "stock_warm", "vcompile_cold", "vcompile_warm", "vcompile_warm_ro",
            "vcompile_warm_nocodegen", "vcompile_warm_jit", *SIZE_CASES}
# What --full says before it starts: measured on 2 CPU cores (torch 2.13).
FULL_MINUTES = 17
# A cold case empties its cache folders before each run; its last run fills them for the warm ones.
# vcompile's cold cases empty Inductor's own folder too (on CPU it keeps the
# vector-ISA probe's test programs), as stock cold does: each is a machine's
# first compile. Otherwise the first of them built the programs and the next
# found them, and one alone against four at once compared unlike starts.
EMPTIED = {"stock_cold": ("stock",), "vcompile_cold": ("vcompile", "scratch"),
           "vcompile_cold_x4": ("together", "scratch"), "vcompile_cold_size": ("vcompile_size", "scratch")}
# Replicas of one model starting together on one node, or the ranks of a
# tensor-parallel world: vcompile cold in this many processes at once, on one
# empty root. Its first output is the last process's, when all of them serve.
TOGETHER = 4
LABELS = {
    "eager": "eager", "stock_cold": "stock cold", "stock_warm": "stock warm",
    "vcompile_cold": "vcompile cold", "vcompile_cold_x4": f"vcompile cold, {TOGETHER} at once",
    "vcompile_warm": "vcompile warm", "vcompile_warm_ro": "vcompile warm, read-only",
    "vcompile_warm_parts": "  (warm, Inductor imported first)",
    "vcompile_cold_nocodegen": "  (setup: cold, no codegen)", "vcompile_warm_nocodegen": "vcompile warm, no codegen",
    "vcompile_cold_jit": "  (setup: cold, JIT)", "vcompile_warm_jit": "vcompile warm, JIT",
    "vcompile_cold_size": "vcompile cold, size 8", "vcompile_warm_size": "vcompile warm, size 8",
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(case: str, layers: int, device: str, cache: str, model_kwargs: dict, iters: int, started: float,
             model_name: str = "decoder") -> dict:
    """One case, in its own process: first output, then steady state."""
    uses_vcompile = case.startswith("vcompile")
    if uses_vcompile:
        import vcompile
    imported = time.perf_counter()
    result: dict = {"import_s": imported - started}
    if case == "vcompile_warm_parts":
        # What any process's first Inductor load pays, whoever compiled the
        # artifact: every generated output module imports Inductor's compiler
        # modules, and on CPU Inductor probes the vector ISA (test libraries
        # built with gcc, dlopened in subprocesses). Done here, apart, the
        # monitor then times vcompile's own load and first run.
        t = time.perf_counter()
        importlib.import_module("torch._inductor.select_algorithm")
        result["inductor_import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if device == "cpu":
            torch._inductor.cpu_vec_isa.pick_vec_isa()
        result["isa_probe_s"] = time.perf_counter() - t
    torch.manual_seed(0)
    hf = model_name.startswith("hf-")
    model = (hf_model(model_name[3:], layers, **model_kwargs) if hf else Decoder(layers, **model_kwargs)).to(device).eval()
    token_dim = 1 if hf else 0  # Hugging Face models take (batch, tokens)

    def token_ids(size):
        ids = torch.randint(0, model_kwargs["vocab"], (size,), device=device)
        return ids[None] if hf else ids

    ids = token_ids(FIRST_SIZE)
    if case == "eager":
        fn = model
    elif case.startswith("stock"):
        torch._dynamo.mark_dynamic(ids, token_dim)
        fn = torch.compile(model, fullgraph=True)
    else:
        cfg = vcompile.CompilationConfig(
            splitting_ops=HF_SPLITTING_OPS if hf else SPLITTING_OPS, cache_dir=cache,
            **(SIZE_CONFIG if case in SIZE_CASES else CONFIG),
            use_codegen=not case.endswith("nocodegen"), use_aot=not case.endswith("jit"))
        fn = vcompile.compile(model, cfg, dynamic_arg_dims={"input_ids": token_dim})
        builds = []  # programs the first call starts but `g++ --version`: g++ per kernel, g++ and python per ISA probe
        real_popen = subprocess.Popen.__init__

        def counted_popen(self, args, *rest, **kwargs):
            if "--version" not in args:
                builds.append(args)
            real_popen(self, args, *rest, **kwargs)

        subprocess.Popen.__init__ = counted_popen
        loads = []  # seconds per unique artifact loaded: where a warm start goes
        real_load = vcompile.load_artifact

        def timed_load(data):
            t = time.perf_counter()
            artifact = real_load(data)
            loads.append(time.perf_counter() - t)
            return artifact

        vcompile.load_artifact = timed_load

    with torch.no_grad():
        called = time.perf_counter()
        out = fn(ids)
        _sync(device)
        first = time.perf_counter()
        result.update(first_output_s=first - started, first_call_s=first - called)
        if uses_vcompile:
            result.update(monitor_s=cfg.compilation_time, artifact_loads_s=sum(loads), builds=len(builds),
                          counters=dataclasses.asdict(vcompile.counters))
        result["max_error"] = (hidden_states(out).float() - hidden_states(model(ids)).float()).abs().max().item()

        ids = token_ids(STEADY_SIZE)
        for _ in range(3):
            fn(ids)
        times = []
        for _ in range(iters):
            _sync(device)
            t = time.perf_counter()
            fn(ids)
            _sync(device)
            times.append(time.perf_counter() - t)
    result["steady_ms"] = 1000 * statistics.median(times)
    return result


# A case's process starts the clock before `import torch`, so imports count.
# Once it has reported, it skips the interpreter's teardown (os._exit after the
# exit handlers): tearing down torch's modules takes 0.5 to 1 s that no case
# measures, and a full sweep starts about a hundred processes.
_CHILD = ("import time, sys; t0 = time.perf_counter(); import atexit, json, os; "
          "args = json.loads(sys.argv[1]); import bench; run = getattr(bench, args.pop('runner')); "
          "print('\\n' + json.dumps(run(started=t0, **args)), flush=True); "
          "atexit._run_exitfuncs(); sys.stderr.flush(); os._exit(0)")


def case_dirs(parent: str) -> dict:
    """Empty cache folders for one depth's cases, under `parent`."""
    dirs = {name: os.path.join(parent, name) for name in ("stock", "vcompile", "vcompile_nocodegen", "together",
                                                          "vcompile_size", "scratch")}
    for path in dirs.values():
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    return dirs


def spawn(case: str, layers: int, device: str, dirs: dict, model_kwargs: dict, iters: int,
          repeats: int = 1, model_name: str = "decoder", runner: str = "run_case") -> dict:
    """Runs a case (the cheap ones several times) and reports each number's
    median over the runs; the JSON keeps every run's first output and steady state."""
    runs = []
    for _ in range(repeats if case in REPEATED else 1):
        for name in EMPTIED.get(case, ()):
            shutil.rmtree(dirs[name], ignore_errors=True)
            os.makedirs(dirs[name])
        if runner == "run_startup_case":
            drop_from_page_cache(weights_file(dirs["vcompile"]))
        if case == "vcompile_cold_x4":
            runs.append(spawn_together(layers, device, dirs, model_kwargs, model_name))
            continue
        runs.append(spawn_once(case, layers, device, dirs, model_kwargs, iters, model_name, runner))
    result = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            result[key] = statistics.median(r[key] for r in runs)
    result["runs"] = [{k: v for k, v in r.items() if isinstance(v, float)} for r in runs]
    return result


def spawn_together(layers: int, device: str, dirs: dict, model_kwargs: dict, model_name: str) -> dict:
    """TOGETHER cold starts at once on one root. The last to reach its first
    output stands for the case; counters are summed over all of them. A
    process that is done times a few calls only, so it barely slows the others."""
    with concurrent.futures.ThreadPoolExecutor(TOGETHER) as pool:
        runs = list(pool.map(lambda _: spawn_once("vcompile_cold_x4", layers, device, dirs, model_kwargs, 3,
                                                  model_name), range(TOGETHER)))
    result = dict(max(runs, key=lambda r: r["first_output_s"]))
    result["counters"] = {k: sum(r["counters"][k] for r in runs) for k in runs[0]["counters"]}
    result["first_outputs_s"] = sorted(r["first_output_s"] for r in runs)
    return result


def spawn_once(case: str, layers: int, device: str, dirs: dict, model_kwargs: dict, iters: int,
               model_name: str, runner: str = "run_case") -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), here]))}
    env.pop("TRITON_CACHE_DIR", None)
    cache = dirs["vcompile_nocodegen"] if "nocodegen" in case else dirs["vcompile"]
    cache = dirs["together"] if case == "vcompile_cold_x4" else dirs["vcompile_size"] if case in SIZE_CASES else cache
    if case.startswith("stock"):
        env["TORCHINDUCTOR_CACHE_DIR"] = dirs["stock"]
    elif case == "vcompile_warm_parts":  # Inductor's first-load work, in the folder the load will use
        env["TORCHINDUCTOR_CACHE_DIR"] = glob.glob(os.path.join(cache, "torch_aot_compile", "*", "inductor_cache"))[0]
    else:  # vcompile sets its own; eager compiles nothing
        env["TORCHINDUCTOR_CACHE_DIR"] = dirs["scratch"]
    args = dict(runner=runner, case=case, layers=layers, device=device, cache=cache, model_kwargs=model_kwargs,
                iters=iters, model_name=model_name)
    argv = [sys.executable, "-c", _CHILD, json.dumps(args)]
    if case == "vcompile_warm_ro":  # the root vcompile_cold filled, shipped read-only
        argv, env = read_only(cache, argv, env)
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=here)
    if proc.returncode != 0:
        raise RuntimeError(f"bench case {case} at {layers} layers failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def read_only(folder: str, argv: list[str], env: dict) -> tuple[list[str], dict]:
    """argv and env for a process that cannot write `folder`, as a cache
    baked into a container image or mounted from a read-only volume cannot
    be written. Where mount namespaces are allowed (root, as CI runs): a
    read-only bind mount of the folder that only that process sees. Elsewhere
    the folder's write bits are cleared while it runs, and a root process
    gives up the capabilities that would let it write anyway."""
    if read_only_by_mount():
        script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, folder, *argv], env
    script = 'chmod -R a-w "$0" && "$@"; status=$?; chmod -R u+w "$0"; exit $status'
    unprivileged = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
    return [*unprivileged, "sh", "-c", script, folder, *argv], env


@functools.cache
def read_only_by_mount() -> bool:
    probe = tempfile.mkdtemp()
    try:
        mount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && ! touch "$0/x" 2>/dev/null'
        return subprocess.run(["unshare", "-m", "sh", "-c", mount, probe], capture_output=True).returncode == 0
    except OSError:  # no unshare
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def ratios(results: dict, depths: list[int]) -> dict:
    """The numbers the targets are about; every one is computed in this run,
    from the cases it ran (the first look runs the headline cases alone)."""
    def overhead(layers, case):  # what compiling or loading adds to the first output
        return results[layers][case]["first_output_s"] - results[layers]["eager"]["first_output_s"]

    def first(layers, case):
        return results[layers][case]["first_output_s"]

    def monitor(layers, case):
        return results[layers][case]["monitor_s"]

    lo, hi = min(depths), max(depths)
    out: dict = {"per_depth": {}}
    for layers in depths:
        r = results[layers]
        d = out["per_depth"][layers] = {
            "stock_warm_over_cold": first(layers, "stock_warm") / first(layers, "stock_cold"),
            "vcompile_warm_over_cold": first(layers, "vcompile_warm") / first(layers, "vcompile_cold"),
            "vcompile_warm_monitor_s": monitor(layers, "vcompile_warm"),
            "stock_warm_overhead_s": overhead(layers, "stock_warm"),
            "vcompile_warm_overhead_s": overhead(layers, "vcompile_warm"),
            "warm_overhead_stock_over_vcompile": overhead(layers, "stock_warm") / overhead(layers, "vcompile_warm"),
            "vcompile_cold_over_stock_cold": overhead(layers, "vcompile_cold") / overhead(layers, "stock_cold"),
            "steady_vcompile_over_stock": r["vcompile_warm"]["steady_ms"] / r["stock_warm"]["steady_ms"],
        }
        if "vcompile_cold_x4" in r:  # --full
            d.update(
                cold_together_over_alone=first(layers, "vcompile_cold_x4") / first(layers, "vcompile_cold"),
                vcompile_warm_load_alone_s=monitor(layers, "vcompile_warm_parts"),
                read_only_over_writable_warm_monitor=monitor(layers, "vcompile_warm_ro") / monitor(layers, "vcompile_warm"),
                nocodegen_minus_codegen_warm_monitor_s=monitor(layers, "vcompile_warm_nocodegen")
                - monitor(layers, "vcompile_warm"),
                size_minus_ranges_cold_monitor_s=monitor(layers, "vcompile_cold_size") - monitor(layers, "vcompile_cold"),
                size_over_ranges_steady=r["vcompile_warm_size"]["steady_ms"] / r["vcompile_warm"]["steady_ms"])
    if hi != lo:
        out["stock_cold_growth"] = overhead(hi, "stock_cold") / overhead(lo, "stock_cold")
        out["vcompile_cold_growth"] = overhead(hi, "vcompile_cold") / overhead(lo, "vcompile_cold")
        out["vcompile_cold_monitor_growth"] = monitor(hi, "vcompile_cold") / monitor(lo, "vcompile_cold")
        out["vcompile_warm_monitor_growth"] = monitor(hi, "vcompile_warm") / monitor(lo, "vcompile_warm")
        if "vcompile_warm_parts" in results[lo]:
            out["vcompile_warm_load_alone_growth"] = (monitor(hi, "vcompile_warm_parts")
                                                      / monitor(lo, "vcompile_warm_parts"))
    return out


def table(results: dict, depths: list[int], summary: dict) -> str:
    sizes = ", ".join(map(str, SIZE_CONFIG["compile_sizes"]))
    lines = [f"\nconfig: every vcompile row compiles one range, [1, {CONFIG['max_num_batched_tokens']}] (vLLM's "
             f"default, no compile size); the 'size {sizes}' rows add compile_sizes=[{sizes}]"]
    for layers in depths:
        lines.append(f"\n{layers} layers")
        lines.append(f"  {'case':28} {'first output':>12} {'import':>8} {'overhead':>9} {'monitor':>8} {'steady':>10}")
        eager = results[layers]["eager"]["first_output_s"]
        for case in (case for case in CASES if case in results[layers]):
            r = results[layers][case]
            monitor = f"{r['monitor_s']:7.2f}s" if "monitor_s" in r else f"{'':8}"
            lines.append(f"  {LABELS[case]:28} {r['first_output_s']:11.2f}s {r['import_s']:7.2f}s "
                         f"{r['first_output_s'] - eager:8.2f}s {monitor} {r['steady_ms']:8.2f}ms")
        d = summary["per_depth"][layers]
        lines.append(f"  warm/cold first output: stock {d['stock_warm_over_cold']:.2f}, vcompile "
                     f"{d['vcompile_warm_over_cold']:.2f}; warm overhead stock/vcompile "
                     f"{d['warm_overhead_stock_over_vcompile']:.1f}x; cold overhead vcompile/stock "
                     f"{d['vcompile_cold_over_stock_cold']:.2f}; steady vcompile/stock "
                     f"{d['steady_vcompile_over_stock']:.3f}")
        if "cold_together_over_alone" not in d:
            continue
        warm, parts = results[layers]["vcompile_warm"], results[layers]["vcompile_warm_parts"]
        lines.append(f"  where vcompile's warm start goes: import {warm['import_s']:.2f}s (torch, and torch._dynamo "
                     f"for the AOT loader), then the monitor's {warm['monitor_s']:.2f}s = Inductor's first-load "
                     f"costs (its compiler modules {parts['inductor_import_s']:.2f}s; the CPU ISA probe, "
                     f"{parts['isa_probe_s']:.2f}s where it runs; the warm start built {warm['builds']} programs) + vcompile's "
                     f"load and first run {parts['monitor_s']:.2f}s "
                     f"({warm['counters']['num_compiled_artifacts_loaded']} unique artifacts)")
        lines.append(f"  read-only/writable warm start {d['read_only_over_writable_warm_monitor']:.2f}x; no-codegen "
                     f"warm costs {d['nocodegen_minus_codegen_warm_monitor_s'] * 1000:+.0f} ms; compile size {sizes} "
                     f"costs {d['size_minus_ranges_cold_monitor_s']:+.2f} s cold, steady with/without "
                     f"{d['size_over_ranges_steady']:.3f} (at {STEADY_SIZE} tokens, not the size)")
        together, alone = results[layers]["vcompile_cold_x4"], results[layers]["vcompile_cold"]
        lines.append(f"  {TOGETHER} cold starts at once on one root / one alone: {d['cold_together_over_alone']:.2f}x; "
                     f"Inductor compiles, all {TOGETHER} together {together['counters']['num_inductor_compiles']}, "
                     f"one alone {alone['counters']['num_inductor_compiles']} (the others took "
                     f"{together['counters']['num_artifacts_from_other_processes']})")
    if "stock_cold_growth" in summary:
        lines.append(f"\ncold growth {min(depths)} -> {max(depths)} layers (overhead): stock "
                     f"{summary['stock_cold_growth']:.2f}x, vcompile {summary['vcompile_cold_growth']:.2f}x "
                     f"(monitor {summary['vcompile_cold_monitor_growth']:.2f}x); vcompile warm monitor "
                     f"{summary['vcompile_warm_monitor_growth']:.2f}x")
    lines.append("\n" + headline(results, depths, summary))
    return "\n".join(lines)


def headline(results: dict, depths: list[int], summary: dict) -> str:
    """The two numbers a first look is for, at the deepest model run."""
    layers = max(depths)
    d = summary["per_depth"][layers]
    return (f"at {layers} layers: vcompile warm adds {d['vcompile_warm_overhead_s']:.2f} s to eager's first output, "
            f"stock torch.compile warm {d['stock_warm_overhead_s']:.2f} s ({d['warm_overhead_stock_over_vcompile']:.1f}x); "
            f"cold, vcompile adds {d['vcompile_cold_over_stock_cold']:.2f}x what stock adds; steady state "
            f"vcompile/stock {d['steady_vcompile_over_stock']:.2f}")


# --- bench.py --generate: decode speed ------------------------------------------

GEN_CASES = ["eager", "stock_cold", "stock_warm", "vcompile_cold", "vcompile_warm"]
# The decode step is one token, a compile size of its own; prompts fall in the ranges.
GEN_CONFIG = dict(compile_sizes=[1], compile_ranges_endpoints=[64], max_num_batched_tokens=256)
PROMPT_SIZE, NEW_TOKENS = 64, 32
# Decode speed is timed in one process, the three calls of each step in turn,
# so that a slower stretch of the machine slows all three alike: a short
# prompt, then a token at every position the cache has left.
ALTERNATED_PROMPT, ALTERNATED_ROUNDS = 16, 2


def generate_model(model_name: str, layers: int, model_kwargs: dict, device: str):
    """The --generate model and a prompt for it. "decoder" is written the
    nanoGPT way: transpose, .contiguous() and view in traced code."""
    torch.manual_seed(0)
    kwargs = {**model_kwargs, "max_tokens": GEN_CONFIG["max_num_batched_tokens"]}
    if model_name.startswith("hf-"):
        model = hf_cached_model(model_name[3:], layers, **kwargs)
    else:
        kwargs.pop("ffn")
        model = StyleDecoder("nanogpt", layers, **kwargs)
    prompt = torch.randint(0, model_kwargs["vocab"], (1, PROMPT_SIZE), device=device)
    return model.to(device), prompt


def vcompile_generate(model: nn.Module, cache: str, capture_sizes: tuple = ()):
    import vcompile

    cfg = vcompile.CompilationConfig(splitting_ops=kv_splitting_ops(model), cache_dir=cache,
                                     cudagraph_capture_sizes=list(capture_sizes), **GEN_CONFIG)
    return vcompile.compile(model, cfg, dynamic_arg_dims={"input_ids": 1, "position_ids": 1}), cfg


def run_generate_case(case: str, layers: int, device: str, cache: str, model_kwargs: dict, started: float,
                      model_name: str = "decoder", iters: int = 0) -> dict:
    """One --generate case, in its own process: greedy decoding of NEW_TOKENS
    after a PROMPT_SIZE-token prompt, every step timed."""
    if model_name.startswith("hf-"):
        return run_hf_generate_case(case, layers, device, cache, model_kwargs, started, model_name)
    uses_vcompile = case.startswith("vcompile")
    if uses_vcompile:
        import vcompile
    result: dict = {"import_s": time.perf_counter() - started}
    model, prompt = generate_model(model_name, layers, model_kwargs, device)
    if case == "eager":
        fn = model
    elif case.startswith("stock"):
        fn = torch.compile(model, fullgraph=True)  # a graph for the prompt, then one for a token
    else:
        fn, cfg = vcompile_generate(model, cache)
    ends = []

    def timed_step(**inputs):
        out = fn(**inputs)
        _sync(device)
        ends.append(time.perf_counter())
        return out

    with torch.no_grad():
        tokens, _ = generate(timed_step, model, prompt, NEW_TOKENS)
    steps = [b - a for a, b in zip(ends, ends[1:])]  # a step: the call, the argmax, the loop
    result.update(first_token_s=ends[0] - started, first_decode_ms=1000 * steps[0],
                  decode_tokens_per_s=1 / statistics.median(steps[1:]), tokens=tokens.tolist())
    if uses_vcompile:
        result.update(monitor_s=cfg.compilation_time, counters=dataclasses.asdict(vcompile.counters))
    return result


def run_decode_alternated(case: str, layers: int, device: str, cache: str, model_kwargs: dict, started: float,
                          model_name: str = "decoder", iters: int = 0) -> dict:
    """Decode step times in one process, the calls of each step in turn:
    medians over every position the cache has after a short prompt. For
    "alternated": eager, stock torch.compile and vcompile (warm from
    `cache`). For "cudagraphs": eager, stock with mode="reduce-overhead" (its
    own CUDA graphs, of whole graphs), vcompile without graphs and vcompile
    with its pieces captured; each step's largest logit difference from
    eager's is kept too."""
    if case == "alternated" and model_name.startswith("hf-"):
        return run_hf_decode_alternated(layers, device, cache, model_kwargs, model_name)
    import vcompile

    model, _ = generate_model(model_name, layers, model_kwargs, device)
    fns = {"eager": model, "stock": torch.compile(copy.deepcopy(model), fullgraph=True),
           "vcompile": vcompile_generate(copy.deepcopy(model), cache)[0]}
    if case == "cudagraphs":
        fns["stock"] = torch.compile(copy.deepcopy(model), fullgraph=True, mode="reduce-overhead")
        fns["vcompile_graphs"] = vcompile_generate(copy.deepcopy(model), os.path.join(cache, "graphs"),
                                                   GRAPH_CAPTURE_SIZES)[0]
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    times: dict = {name: [] for name in fns}
    errors: dict = {name: 0.0 for name in fns}
    with torch.no_grad():
        prompt = torch.arange(ALTERNATED_PROMPT, device=device)[None]
        for fn in fns.values():  # compiles or loads, stock's graph for one token, vcompile's captures
            fn(input_ids=prompt, position_ids=prompt)
            fn(input_ids=ids, position_ids=prompt[:, -1:] + 1)
        for position in range(ALTERNATED_PROMPT, GEN_CONFIG["max_num_batched_tokens"]):
            positions = torch.full((1, 1), position, device=device)
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                out = fn(input_ids=ids, position_ids=positions)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                out = getattr(out, "logits", out)  # a Hugging Face ModelOutput, or the logits
                if name == "eager":
                    expected = out
                errors[name] = max(errors[name], (out - expected).abs().max().item())
    return {"steps": len(times["eager"]), **{f"{name}_step_ms": 1000 * statistics.median(t) for name, t in times.items()},
            **{f"{name}_max_error": e for name, e in errors.items()}, "captured": vcompile.counters.num_cudagraph_captured}


# --- bench.py --generate --model hf-*: transformers' generate() -----------------
# A Hugging Face model generates with transformers' own loop, and so do its
# cases: eager is transformers' model with its DynamicCache; stock is
# transformers' documented way to compile generation, a static cache and
# torch.compile(model.forward) (default mode); vcompile is hf_generation_pair's.
# A streamer times the steps: generate() hands it the prompt, then each token.
# A second generate() of another prompt length counts what compiles mid-run.

HF_GEN_CONFIG = dict(compile_sizes=[1], compile_ranges_endpoints=[64])  # GEN_CONFIG's, in the pair's 256 tokens
LATER_PROMPT, LATER_TOKENS = 16, 8


class StepTimes:
    """A streamer for generate(): the time of each put(), the prompt's first."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generators(model_name: str, layers: int, model_kwargs: dict, device: str, cache: str) -> dict:
    """The three models of a Hugging Face --generate case, with one set of weights."""
    torch.manual_seed(0)
    model, eager = hf_generation_pair(model_name[3:], layers, cache, config=HF_GEN_CONFIG, **model_kwargs)
    stock = copy.deepcopy(eager)
    stock.generation_config.cache_implementation = "static"
    stock.forward = torch.compile(stock.forward, fullgraph=True)
    return {"eager": eager.to(device), "stock": stock.to(device), "vcompile": model.to(device)}


def timed_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[float], int]:
    """Greedy generate() of exactly new_tokens: the tokens, the time of each
    (from the clock of time.perf_counter) and the Dynamo graphs compiled meanwhile."""
    streamer, graphs = StepTimes(str(prompt.device)), torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    return out[0, prompt.shape[1]:].tolist(), streamer.times[1:], compiled


def run_hf_generate_case(case: str, layers: int, device: str, cache: str, model_kwargs: dict,
                         started: float, model_name: str) -> dict:
    import vcompile

    result: dict = {"import_s": time.perf_counter() - started}
    fn = hf_generators(model_name, layers, model_kwargs, device, cache)[case.split("_")[0]]
    prompt = torch.randint(0, model_kwargs["vocab"], (1, PROMPT_SIZE), device=device)
    tokens, ends, graphs = timed_generate(fn, prompt, NEW_TOKENS)
    steps = [b - a for a, b in zip(ends, ends[1:])]
    result.update(first_token_s=ends[0] - started, first_decode_ms=1000 * steps[0],
                  decode_tokens_per_s=1 / statistics.median(steps[1:]), tokens=tokens, graphs=graphs,
                  later_graphs=timed_generate(fn, prompt[:, :LATER_PROMPT], LATER_TOKENS)[2])
    if case.startswith("vcompile"):
        compiled = fn.forward.args[0]  # the CompiledModel that generation_step calls
        result.update(monitor_s=compiled.config.compilation_time, counters=dataclasses.asdict(vcompile.counters))
    return result


def run_hf_decode_alternated(layers: int, device: str, cache: str, model_kwargs: dict, model_name: str) -> dict:
    """Decode steps of the three models' generate() in turn in one process,
    each compiled or loaded first: medians over ALTERNATED_ROUNDS generate()
    calls each, every position the cache has after a short prompt."""
    fns = hf_generators(model_name, layers, model_kwargs, device, cache)
    prompt = torch.randint(0, model_kwargs["vocab"], (1, ALTERNATED_PROMPT), device=device)
    new_tokens = GENERATE_POSITIONS - ALTERNATED_PROMPT
    for fn in fns.values():
        timed_generate(fn, prompt, new_tokens)
    times, tokens, graphs = {name: [] for name in fns}, {}, {name: 0 for name in fns}
    for _ in range(ALTERNATED_ROUNDS):
        for name, fn in fns.items():
            tokens[name], ends, compiled = timed_generate(fn, prompt, new_tokens)
            times[name] += [b - a for a, b in zip(ends, ends[1:])]
            graphs[name] += compiled
    return {"steps": len(times["eager"]), **{f"{name}_step_ms": 1000 * statistics.median(t) for name, t in times.items()},
            **{f"{name}_graphs": g for name, g in graphs.items()},
            "same_tokens": tokens["stock"] == tokens["eager"] == tokens["vcompile"]}


# --- bench.py --cudagraphs: piecewise CUDA graphs ---------------------------------
# The --generate model's decode step, with run_decode_alternated("cudagraphs"):
# vcompile with every piece captured at the capture sizes against vcompile
# without graphs, stock torch.compile(mode="reduce-overhead") and eager.
# CUDA graphs need CUDA: on a machine without, the bench says so and exits 0.

GRAPH_CAPTURE_SIZES = (1, 2, 4, 8)


def cudagraphs_table(results: dict, depths: list[int]) -> str:
    lines = [f"\n  {'layers':>6} {'eager':>9} {'stock r-o':>10} {'vcompile':>9} {'graphs':>9} {'graphs/without':>15}"
             f"  max |diff| from eager: stock, vcompile, graphs"]
    for layers in depths:
        r = results[layers]["cudagraphs"]
        lines.append(f"  {layers:>6} {r['eager_step_ms']:7.2f}ms {r['stock_step_ms']:8.2f}ms "
                     f"{r['vcompile_step_ms']:7.2f}ms {r['vcompile_graphs_step_ms']:7.2f}ms "
                     f"{r['vcompile_graphs_step_ms'] / r['vcompile_step_ms']:14.2f}x  {r['stock_max_error']:.1e}, "
                     f"{r['vcompile_max_error']:.1e}, {r['vcompile_graphs_max_error']:.1e}")
    lines.append(f"  decode step at one token, medians of {results[depths[0]]['cudagraphs']['steps']} steps "
                 "alternated in one process; stock r-o: torch.compile(mode='reduce-overhead')")
    return "\n".join(lines)


def generate_summary(results: dict, depths: list[int]) -> dict:
    out: dict = {}
    for layers in depths:
        r, steps = results[layers], results[layers]["alternated"]
        out[layers] = {
            "decode_vcompile_over_stock": steps["vcompile_step_ms"] / steps["stock_step_ms"],
            "decode_vcompile_over_eager": steps["vcompile_step_ms"] / steps["eager_step_ms"],
            "first_token_warm_stock_minus_vcompile_s": r["stock_warm"]["first_token_s"] - r["vcompile_warm"]["first_token_s"],
            "same_tokens_as_eager": {case: r[case]["tokens"] == r["eager"]["tokens"] for case in GEN_CASES},
        }
    return out


def generate_table(results: dict, depths: list[int], summary: dict) -> str:
    lines = []
    for layers in depths:
        lines.append(f"\n{layers} layers: {NEW_TOKENS} tokens after a {PROMPT_SIZE}-token prompt")
        hf = "graphs" in results[layers]["eager"]  # transformers' generate(): the graphs each compiled too
        lines.append(f"  {'case':16} {'first token':>12} {'monitor':>8} {'first decode step':>18} {'decode':>12}  tokens"
                     + "  graphs" * hf)
        for case in GEN_CASES:
            r = results[layers][case]
            monitor = f"{r['monitor_s']:7.2f}s" if "monitor_s" in r else f"{'':8}"
            same = "(reference)" if case == "eager" else "same" if summary[layers]["same_tokens_as_eager"][case] else "DIFFER"
            graphs = f"  {r['graphs']} + {r['later_graphs']}" if hf else ""
            lines.append(f"  {LABELS[case]:16} {r['first_token_s']:11.2f}s {monitor} {r['first_decode_ms']:16.1f}ms "
                         f"{r['decode_tokens_per_s']:7.1f} tok/s  {same:11}{graphs}")
        d, steps = summary[layers], results[layers]["alternated"]
        lines.append(f"  decode step, medians of {steps['steps']} alternated in one process: eager "
                     f"{steps['eager_step_ms']:.2f} ms, stock {steps['stock_step_ms']:.2f} ms, vcompile "
                     f"{steps['vcompile_step_ms']:.2f} ms: vcompile/stock {d['decode_vcompile_over_stock']:.2f}x, "
                     f"vcompile/eager {d['decode_vcompile_over_eager']:.2f}x")
        lines.append(f"  first token warm: vcompile {d['first_token_warm_stock_minus_vcompile_s']:.2f} s ahead of stock")
    if hf:
        steps = results[depths[-1]]["alternated"]
        lines.append("  every case through transformers' generate(); stock is its recipe, "
                     "cache_implementation='static' and torch.compile(model.forward)")
        lines.append(f"  graphs: Dynamo graphs compiled in the first generate() + in a second of a {LATER_PROMPT}-token "
                     f"prompt; in the alternated ones stock {steps['stock_graphs']}, vcompile "
                     f"{steps['vcompile_graphs']}, tokens {'the same' if steps['same_tokens'] else 'DIFFER'}")
    return "\n".join(lines)


# --- bench.py --passes: what a graph pass buys ------------------------------------
# vLLM calls its norms and activations as custom ops (its own kernels), which
# Inductor cannot see into or fuse with what is around them; its fusion passes
# put fused kernels in their place. The stand-in that runs anywhere: bench's
# decoder with RMSNorm and SiLU-and-mul as opaque custom ops, compiled by
# vcompile without and with a pass that puts their ATen decomposition back
# (through Inductor's pattern matcher, as vLLM's passes work), so that Inductor
# fuses them with the residual adds around them. Steady state at
# each size in one process, eager's, vcompile's and vcompile's with the pass
# calls in turn; outputs checked against eager first.

PASSES_SIZES = [1, 128]
PASSES_CALLS = 100


@torch.library.custom_op("vcompile_bench::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("vcompile_bench::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@silu_and_mul.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


class OpaqueRMSNorm(RMSNorm):
    def forward(self, x):
        return torch.ops.vcompile_bench.rms_norm(x, self.weight, self.eps)


class OpaqueDecoderLayer(DecoderLayer):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__(hidden, heads, ffn)
        self.input_norm, self.post_norm = OpaqueRMSNorm(hidden), OpaqueRMSNorm(hidden)

    def forward(self, x, positions=None):
        q, k, v = self.qkv(self.input_norm(x)).chunk(3, dim=-1)
        x = x + self.o_proj(self.attention(q, k, v, positions))
        return x + self.down(torch.ops.vcompile_bench.silu_and_mul(self.gate_up(self.post_norm(x))))


class OpaqueDecoder(Decoder):
    """bench.Decoder computing the same, its norms and activation opaque."""

    def __init__(self, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 256):
        super().__init__(layers, hidden, heads, ffn, vocab)
        self.layers = nn.ModuleList(OpaqueDecoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.norm = OpaqueRMSNorm(hidden)


def opaque_rms_norm(x, weight):
    return torch.ops.vcompile_bench.rms_norm(x, weight, 1e-6)


def aten_rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def opaque_silu_and_mul(x):
    return torch.ops.vcompile_bench.silu_and_mul(x)


def aten_silu_and_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class Decompose:
    """A graph pass: each opaque op becomes its ATen decomposition. The
    patterns are traced once, when the pass is made; the replacement is
    traced again at each match, with the shapes found there. The eps is in
    the pattern, as vLLM registers its RMSNorm patterns once per epsilon."""

    def __init__(self):
        from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

        self.patterns, self.replaced = PatternMatcherPass(), 0
        register_replacement(opaque_rms_norm, aten_rms_norm, [torch.empty(4, 8), torch.empty(8)], fwd_only,
                             self.patterns)
        register_replacement(opaque_silu_and_mul, aten_silu_and_mul, [torch.empty(4, 8)], fwd_only, self.patterns)

    def __call__(self, graph):
        self.replaced += self.patterns.apply(graph)


def run_passes(case: str, layers: int, device: str, cache: str, model_kwargs: dict, started: float,
               model_name: str = "decoder", iters: int = PASSES_CALLS) -> dict:
    import vcompile

    torch.manual_seed(0)
    model, decompose = OpaqueDecoder(layers, **model_kwargs).to(device), Decompose()
    fns = {"eager": model}
    for name, passes in (("vcompile", []), ("vcompile_pass", [decompose])):
        config = vcompile.CompilationConfig(splitting_ops=SPLITTING_OPS, cache_dir=os.path.join(cache, name),
                                            passes=passes, **CONFIG)
        fns[name] = vcompile.compile(model, config)
    out: dict = {"replaced": 0}
    with torch.no_grad():
        for size in PASSES_SIZES:
            ids = torch.randint(0, model_kwargs["vocab"], (size,), generator=torch.Generator().manual_seed(size)).to(device)
            expected = model(ids)
            for name in ("vcompile", "vcompile_pass"):  # compiles at the first size
                out[f"{name}_max_error_{size}"] = (fns[name](ids) - expected).abs().max().item()
            times: dict = {name: [] for name in fns}
            for _ in range(iters):
                for name, fn in fns.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn(ids)
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
            out.update({f"{name}_ms_{size}": 1000 * statistics.median(t) for name, t in times.items()})
    out["replaced"] = decompose.replaced
    return out


def passes_table(results: dict, depths: list[int]) -> str:
    lines = [f"\n  {'layers':>6} {'tokens':>6} {'eager':>9} {'vcompile':>9} {'with pass':>10} {'pass/without':>13}"
             f"  max |diff| from eager, without / with"]
    for layers in depths:
        r = results[layers]["passes"]
        for size in PASSES_SIZES:
            lines.append(f"  {layers:>6} {size:>6} {r[f'eager_ms_{size}']:7.2f}ms {r[f'vcompile_ms_{size}']:7.2f}ms "
                         f"{r[f'vcompile_pass_ms_{size}']:8.2f}ms "
                         f"{r[f'vcompile_pass_ms_{size}'] / r[f'vcompile_ms_{size}']:12.2f}x  "
                         f"{r[f'vcompile_max_error_{size}']:.1e} / {r[f'vcompile_pass_max_error_{size}']:.1e}")
    lines.append(f"  medians of {PASSES_CALLS} calls of each, alternated in one process; the pass's matches in the "
                 "compiles that ran (identical layers compile once): "
                 + ", ".join(f"{results[d]['passes']['replaced']} at {d} layers" for d in depths))
    return "\n".join(lines)


# --- bench.py --startup: a server's start, weights on disk -------------------------
# What a deployment pays before its first request: import, build the model
# empty, read about 1 GB of float32 weights from a safetensors file, run.
# Each case a fresh process, from before `import torch` to the first output.
# The file is dropped from the page cache before each case, so every process
# reads it from the disk, as the first start after a boot does.

STARTUP_MODEL = dict(hidden=2048, heads=16, ffn=8192, vocab=1024)  # 268 MB of float32 per layer
STARTUP_CASES = ["startup_eager", "startup_cold", "startup_cold_prepared", "startup_warm", "startup_warm_prepared"]
REPEATED.update({"startup_eager", "startup_warm", "startup_warm_prepared"})
LABELS.update({"startup_eager": "eager", "startup_cold": "vcompile cold",
               "startup_cold_prepared": "vcompile cold, prepared", "startup_warm": "vcompile warm",
               "startup_warm_prepared": "vcompile warm, prepared"})
EMPTIED.update({"startup_cold": ("vcompile",), "startup_cold_prepared": ("vcompile",)})


def weights_file(cache: str) -> str:
    """The depth's weights, beside its cache folders."""
    return os.path.join(os.path.dirname(cache), "weights.safetensors")


def write_weights(path: str, layers: int, model_kwargs: dict) -> int:
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = Decoder(layers, **model_kwargs)
    save_model(model, path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def drop_from_page_cache(path: str) -> None:
    """The next read of `path` comes from the disk (clean pages are dropped;
    on a file system in memory, such as tmpfs, this does nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_startup_case(case: str, layers: int, device: str, cache: str, model_kwargs: dict, started: float,
                     iters: int = 0, model_name: str = "decoder") -> dict:
    """A start, in its own process: build empty (on the meta device, then
    memory left uninitialized), load the weights, first call at FIRST_SIZE.
    "prepared": prepare(background=True) before the load, from an example of
    one token, as README's "Compiling at start-up" says."""
    from safetensors.torch import load_model

    uses_vcompile = case != "startup_eager"
    if uses_vcompile:
        import vcompile
    imported = time.perf_counter()
    with torch.device("meta"):
        model = Decoder(layers, **model_kwargs)
    model = model.to_empty(device=device).eval()
    fn = model
    if uses_vcompile:
        cfg = vcompile.CompilationConfig(splitting_ops=SPLITTING_OPS, cache_dir=cache, **CONFIG)
        fn = vcompile.compile(model, cfg)
        if case.endswith("prepared"):
            fn.prepare(torch.zeros(1, dtype=torch.long, device=device), background=True)
    built = time.perf_counter()
    load_model(model, weights_file(cache), device=device)
    loaded = time.perf_counter()
    torch.manual_seed(0)
    ids = torch.randint(0, model_kwargs["vocab"], (FIRST_SIZE,), device=device)
    with torch.no_grad():
        out = fn(ids)
        _sync(device)
        first = time.perf_counter()
        error = (out - model(ids)).abs().max().item()
    result = {"import_s": imported - started, "build_s": built - imported, "weight_load_s": loaded - built,
              "first_call_s": first - loaded, "first_output_s": first - started, "max_error": error}
    if uses_vcompile:
        result.update(monitor_s=cfg.compilation_time, counters=dataclasses.asdict(vcompile.counters))
    return result


def startup_summary(results: dict, depths: list[int]) -> dict:
    """What prepare(background=True) hides: of the two things a start does
    after the build, the weight load (eager's, alone) and the compiled load
    or compile (vcompile's first call less eager's), the part the prepared
    start no longer waits for. Counted from the end of the imports: a
    prepared and an unprepared process import the same modules, but one
    import can take 0.3 s longer than the next on a shared machine."""
    def after_import(r):
        return r["first_output_s"] - r["import_s"]

    out: dict = {}
    for layers in depths:
        r = results[layers]
        eager = r["startup_eager"]
        out[layers] = {"weight_load_s": eager["weight_load_s"]}
        for start in ("warm", "cold"):
            alone, prepared = r[f"startup_{start}"], r[f"startup_{start}_prepared"]
            hidden = after_import(alone) - after_import(prepared)
            load = alone["first_call_s"] - eager["first_call_s"]
            out[layers].update({
                f"{start}_load_s": load, f"{start}_hidden_s": hidden,
                f"{start}_hidden_of_smaller": hidden / min(eager["weight_load_s"], load),
                f"{start}_over_eager": alone["first_output_s"] / eager["first_output_s"],
                f"{start}_prepared_over_eager": prepared["first_output_s"] / eager["first_output_s"],
            })
    return out


def startup_table(results: dict, depths: list[int], summary: dict, sizes: dict) -> str:
    lines = []
    for layers in depths:
        lines.append(f"\n{layers} layers, {sizes[layers] / 1e9:.2f} GB of float32 weights read from disk")
        lines.append(f"  {'case':26} {'first output':>12} {'import':>8} {'weights':>8} {'first call':>11} {'monitor':>8}")
        for case in STARTUP_CASES:
            r = results[layers][case]
            monitor = f"{r['monitor_s']:7.2f}s" if "monitor_s" in r else f"{'':8}"
            lines.append(f"  {LABELS[case]:26} {r['first_output_s']:11.2f}s {r['import_s']:7.2f}s "
                         f"{r['weight_load_s']:7.2f}s {r['first_call_s']:10.2f}s {monitor}")
        d = summary[layers]
        for start, work in (("warm", "compiled load"), ("cold", "compile")):
            lines.append(f"  {start}: weight load alone {d['weight_load_s']:.2f} s, {work} alone "
                         f"{d[f'{start}_load_s']:.2f} s; prepare in the background hid {d[f'{start}_hidden_s']:.2f} s, "
                         f"{100 * d[f'{start}_hidden_of_smaller']:.0f}% of the smaller; first output / eager's "
                         f"{d[f'{start}_over_eager']:.2f}x, prepared {d[f'{start}_prepared_over_eager']:.2f}x")
    return "\n".join(lines)


def plot(results: dict, depths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in CASES if not LABELS[c].startswith(" ") and c in results[depths[0]]]  # no setup cases
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        xs = [d + (i - len(cases) / 2) * width for d in range(len(depths))]
        eager = [results[d]["eager"]["first_output_s"] for d in depths]
        axes[0].bar(xs, [results[d][case]["first_output_s"] - e for d, e in zip(depths, eager)], width,
                    label=LABELS[case].strip())
        axes[1].bar(xs, [results[d][case]["steady_ms"] for d in depths], width, label=LABELS[case].strip())
    for ax, title in zip(axes, ["first output minus eager's (s)", "steady state per forward (ms)"]):
        ax.set_xticks(range(len(depths)), [f"{d} layers" for d in depths])
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", help="depths to run (default 2 32; --full: 2 8 32)")
    parser.add_argument("--full", action="store_true",
                        help=f"every case, three runs of each headline case (about {FULL_MINUTES} min on 2 CPU cores)")
    parser.add_argument("--quick", action="store_true", help="each case once, 5 timed calls (a smoke run of --full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=MODEL["hidden"], help="model width (default %(default)s)")
    parser.add_argument("--model", default="decoder", choices=["decoder", *(f"hf-{n}" for n in HF_MODELS)],
                        help="bench.Decoder, or a Hugging Face decoder of the same size (needs transformers)")
    parser.add_argument("--json", metavar="PATH", help="write every number, with device, torch version and date")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG (needs matplotlib)")
    parser.add_argument("--keep", metavar="DIR", help="keep the caches in DIR instead of a temporary folder")
    parser.add_argument("--generate", action="store_true",
                        help=f"decode speed instead: {NEW_TOKENS} greedy tokens after a {PROMPT_SIZE}-token prompt, "
                             "with a key/value cache")
    parser.add_argument("--startup", action="store_true",
                        help="start-up instead: a wide decoder (268 MB of float32 weights per layer) loaded from a "
                             "safetensors file, eager against vcompile warm and cold, with and without prepare() "
                             "(default depth 4, about 1 GB; needs safetensors)")
    parser.add_argument("--passes", action="store_true",
                        help=f"graph passes instead: the decoder with opaque RMSNorm and SiLU-and-mul ops, vcompile "
                             f"without and with a pass that decomposes them, steady state at {PASSES_SIZES} tokens")
    parser.add_argument("--cudagraphs", action="store_true",
                        help=f"CUDA graphs instead: decode steps with vcompile's pieces captured at "
                             f"{list(GRAPH_CAPTURE_SIZES)} tokens against vcompile without, stock torch.compile "
                             f"(reduce-overhead) and eager (needs CUDA)")
    args = parser.parse_args(argv)
    if args.generate + args.startup + args.passes + args.cudagraphs > 1:
        parser.error("--generate, --startup, --passes and --cudagraphs are four benches; run them one at a time")
    if args.plot and (args.generate or args.startup or args.passes or args.cudagraphs):
        parser.error("--plot draws the compile cases; it does not go with another bench")
    if args.cudagraphs and args.device != "cuda":
        print(f"bench --cudagraphs: CUDA graphs need CUDA, and the device is {args.device}: nothing to measure")
        return
    if (args.startup or args.passes) and args.model != "decoder":
        parser.error("--startup and --passes run bench.Decoder only")
    if args.startup:
        try:
            import safetensors  # noqa: F401
        except ImportError:
            parser.error("--startup needs safetensors, which is not installed (pip install safetensors)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    if args.model.startswith("hf-"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            parser.error(f"--model {args.model} needs transformers, which is not installed (pip install transformers)")
    benches = args.generate or args.startup or args.passes or args.cudagraphs
    if args.full and benches:
        parser.error("--full is the compile sweep; the other benches have no reduced form")
    depths = args.layers or ([4] if args.startup else [2, 8, 32] if args.full or benches else [2, 32])
    iters = 5 if args.quick else 30
    repeats = 3 if (args.full or args.generate) and not args.quick else 1
    model_kwargs = STARTUP_MODEL if args.startup else {**MODEL, "hidden": args.hidden}
    import vcompile

    device_name = vcompile.device_description(torch.device(args.device))
    cases, runner = (GEN_CASES, "run_generate_case") if args.generate else (CASES if args.full else HEADLINE, "run_case")
    if args.startup:
        cases, runner = STARTUP_CASES, "run_startup_case"
        print(f"bench --startup: decoder {STARTUP_MODEL} on {args.device} ({device_name}), torch "
              f"{torch.__version__}, layers {depths}, weights from safetensors read from disk, first output at "
              f"{FIRST_SIZE} tokens", flush=True)
    elif args.cudagraphs:
        print(f"bench --cudagraphs: {args.model} on {args.device} ({device_name}), torch {torch.__version__}, "
              f"layers {depths}, decode steps, pieces captured at {list(GRAPH_CAPTURE_SIZES)} tokens", flush=True)
    elif args.passes:
        print(f"bench --passes: decoder with opaque norms and activation on {args.device} ({device_name}), torch "
              f"{torch.__version__}, layers {depths}, steady state at {PASSES_SIZES} tokens", flush=True)
    elif args.generate:
        print(f"bench --generate: {args.model} on {args.device} ({device_name}), torch {torch.__version__}, layers "
              f"{depths}, {NEW_TOKENS} greedy tokens after a {PROMPT_SIZE}-token prompt", flush=True)
    else:
        print(f"bench: {args.model} on {args.device} ({device_name}), torch {torch.__version__}, layers {depths}, "
              f"first output at {FIRST_SIZE} tokens, steady state at {STEADY_SIZE} tokens x {iters} calls", flush=True)
        print(f"  every case in a fresh process, {repeats} run{'s' * (repeats > 1)} each; " + (
            f"expect about {FULL_MINUTES} min on 2 CPU cores" if args.full and not args.quick else
            "the headline cases (python bench.py --full for every case, 3 runs each)" if not args.full else
            "each case once"), flush=True)

    base = args.keep or tempfile.mkdtemp(prefix="vcompile-bench-")
    results: dict = {}
    sizes: dict = {}  # bytes of weights per depth, --startup
    try:
        if args.device == "cpu":
            # Inductor builds a precompiled C++ header once per machine, in a
            # global folder outside every cache: build it before timing, so the
            # first cold case does not pay for all the others.
            spawn("stock_cold", 1, args.device, case_dirs(os.path.join(base, "warmup")), model_kwargs, 1,
                  model_name=args.model)
        for layers in depths:
            dirs = case_dirs(os.path.join(base, f"{layers}-layers"))
            results[layers] = {}
            if args.startup:
                sizes[layers] = write_weights(weights_file(dirs["vcompile"]), layers, model_kwargs)
            if args.cudagraphs:
                r = results[layers]["cudagraphs"] = spawn_once("cudagraphs", layers, args.device, dirs, model_kwargs,
                                                               0, args.model, "run_decode_alternated")
                print(f"  {layers:>3} layers  decode step with graphs/without: "
                      f"{r['vcompile_graphs_step_ms'] / r['vcompile_step_ms']:.2f}x", flush=True)
                continue
            if args.passes:
                r = results[layers]["passes"] = spawn_once("passes", layers, args.device, dirs, model_kwargs,
                                                           PASSES_CALLS, args.model, "run_passes")
                print(f"  {layers:>3} layers  with the pass/without, at {PASSES_SIZES} tokens: " + ", ".join(
                    f"{r[f'vcompile_pass_ms_{s}'] / r[f'vcompile_ms_{s}']:.2f}x" for s in PASSES_SIZES), flush=True)
                continue
            for case in cases:
                r = spawn(case, layers, args.device, dirs, model_kwargs, iters, repeats=repeats,
                          model_name=args.model, runner=runner)
                results[layers][case] = r
                print(f"  {layers:>3} layers  {progress_line(case, r)}", flush=True)
            if args.generate:
                results[layers]["alternated"] = spawn_once("alternated", layers, args.device, dirs, model_kwargs, 0,
                                                           args.model, "run_decode_alternated")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    if args.passes or args.cudagraphs:
        summary = {}
        print(passes_table(results, depths) if args.passes else cudagraphs_table(results, depths))
    elif args.startup:
        summary = startup_summary(results, depths)
        print(startup_table(results, depths, summary, sizes))
    elif args.generate:
        summary = generate_summary(results, depths)
        print(generate_table(results, depths, summary))
    else:
        summary = ratios(results, depths)
        print(table(results, depths, summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model_name": args.model, "device": args.device, "device_name": device_name,
                       "torch": torch.__version__, "python": platform.python_version(),
                       "date": datetime.date.today().isoformat(), "model": model_kwargs,
                       **({"config": GEN_CONFIG, "prompt_size": PROMPT_SIZE, "new_tokens": NEW_TOKENS}
                          if args.generate else {"config": GEN_CONFIG, "capture_sizes": GRAPH_CAPTURE_SIZES}
                          if args.cudagraphs else {"config": CONFIG, "sizes": PASSES_SIZES, "calls": PASSES_CALLS}
                          if args.passes else {"config": CONFIG, "first_size": FIRST_SIZE, "weight_bytes": sizes}
                          if args.startup else {"config": CONFIG, "size_config": SIZE_CONFIG, "first_size": FIRST_SIZE,
                                                "steady_size": STEADY_SIZE, "steady_calls": iters}),
                       "results": results, "ratios": summary}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, depths, args.plot)
        print(f"wrote {args.plot}")


def progress_line(case: str, r: dict) -> str:
    monitor = f", monitor {r['monitor_s']:.2f} s" if "monitor_s" in r else ""
    if "first_token_s" in r:
        return (f"{LABELS[case]:28} first token {r['first_token_s']:7.2f} s (import {r['import_s']:.2f} s{monitor}), "
                f"decode {r['decode_tokens_per_s']:.1f} tokens/s")
    if "weight_load_s" in r:
        return (f"{LABELS[case]:28} first output {r['first_output_s']:7.2f} s (import {r['import_s']:.2f} s, "
                f"weights {r['weight_load_s']:.2f} s{monitor})")
    return (f"{LABELS[case].strip():28} first output {r['first_output_s']:7.2f} s (import {r['import_s']:.2f} s"
            f"{monitor}), steady {r['steady_ms']:.2f} ms")


if __name__ == "__main__":
    main()
