r"""Saved activations of one training forward, counted op by op as our code and transformers' blocks save them.

Each block is replayed symbolically: every tensor has a size and a requires-grad flag, and every op saves
what its backward needs *given which inputs require grad* (autograd saves nothing for an op none of whose
inputs requires grad). Tensors are named, so one saved twice (x for q, k and v) counts once. The rules:

* linear, frozen: nothing (dX = dY W needs only W). Full: its input x (dW = dYᵀ x). Adapted: the method's
  rule (:class:`~peftlab.core.registry.EstimateRules` ``linear_saved``; LoRA: x and xa, the dropout mask
  regenerated; AdaLoRA: x and x (A⊙E)ᵀ). The output requires grad if x does or anything in the layer trains.
* RMSNorm (Llama): x (its fp32 copy under half precision) and rsqrt (M, 1) if x requires grad; the
  normalised x if the norm weight trains. LayerNorm (BERT): x, mean and rstd if anything needs grad.
* SiLU / GELU: their input; ReLU / tanh: their output; a product a·b: a if b requires grad and vice versa.
* dropout (training, p > 0): its keep-mask, in the activation dtype on a CPU (``input * noise``), one byte
  on CUDA (``native_dropout``'s bool mask).
* attention through SDPA's flash/efficient kernels: q, k, v (k, v at num_key_value_heads), the output and
  the logsumexp (B, heads, T) fp32. With attention dropout on a CPU, and for eager attention, the math
  path: scaled q and k, the softmax probabilities, the dropout mask and the dropped probabilities, and v.
* bottleneck adapters: the adapted sublayer output h (W_down's input), the activation's output (ReLU:
  W_up's input, shared), plus the pre-activation for GELU/SiLU.
* prefix tuning: k and v get n_prefix more positions and require grad in every layer (the prefix trains).
* adapters on the input embeddings (LoRA, trainable tokens) and a head tied to them: the method's rules
  (:class:`~peftlab.core.registry.EstimateRules` ``embedding_saved`` / ``head_saved``); the embeddings' output
  then requires grad.

With gradient checkpointing a block keeps only :func:`peftlab.training.memory.checkpoint_kept_bytes`: its input,
plus with selective checkpointing the outputs of its GEMMs and attention (counted here as ``kept``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training.memory import checkpoint_kept_bytes


@dataclass
class BlockCost:
    """One block: ``saved`` bytes without checkpointing, ``gemm_outputs`` (what selective keeps beside the
    input), ``input`` bytes, ``transient`` (activation gradients live during its backward)."""

    saved: int
    gemm_outputs: int
    input: int
    transient: int

    def kept(self, checkpointing: str) -> int:
        if checkpointing == "none":
            return self.saved
        return checkpoint_kept_bytes(self.input, self.gemm_outputs, checkpointing == "selective")

    def recompute(self, checkpointing: str) -> int:
        """Bytes rematerialised during this block's backward (0 without checkpointing)."""
        if checkpointing == "none":
            return 0
        if checkpointing == "full":
            return self.saved
        return max(self.saved - self.gemm_outputs, 0)


class Graph:
    """Symbolic forward: requires-grad flags and saved tensors (name -> bytes) of one block."""

    def __init__(self, e: int, device: str, a_bytes: int = 4) -> None:
        self.e, self.device, self.a = e, device, a_bytes
        self.rg: dict[str, bool] = {}
        self.saved: dict[str, int] = {}
        self.gemm = 0

    def save(self, name: str, nbytes: int) -> None:
        self.saved[name] = nbytes

    def linear(self, x: str, out: str, lin, m: int) -> None:
        e = self.e
        if lin.kind == "full":
            self.save(x, m * lin.d_in * e)
            self.gemm += m * lin.d_out * e
            self.rg[out] = True
        elif lin.kind == "adapted":  # the method's own rule (EstimateRules.linear_saved)
            lin.rules.linear_saved(self, x, out, lin, m)
        else:
            self.gemm += m * lin.d_out * e
            self.rg[out] = self.rg[x]

    def rms(self, x: str, out: str, m: int, h: int, trains: bool) -> None:
        if self.rg[x]:
            self.save(x if self.e >= 4 else x + ".f32", m * h * max(self.e, 4))
            self.save(out + ".rstd", m * 4)
        if trains:
            self.save(out + ".normed", m * h * self.e)
        self.rg[out] = self.rg[x] or trains

    def layernorm(self, x: str, out: str, m: int, h: int, trains: bool) -> None:
        if self.rg[x] or trains:
            self.save(x, m * h * self.e)
            self.save(out + ".stats", 2 * m * 4)
        self.rg[out] = self.rg[x] or trains

    def act(self, kind: str, x: str, out: str, numel: int) -> None:
        if self.rg[x]:
            self.save(out if kind in ("relu", "tanh") else x, numel * self.e)
        self.rg[out] = self.rg[x]

    def mul(self, a: str, b: str, out: str, numel: int) -> None:
        if self.rg[a]:
            self.save(b, numel * self.e)
        if self.rg[b]:
            self.save(a, numel * self.e)
        self.rg[out] = self.rg[a] or self.rg[b]

    def dropout(self, x: str, out: str, numel: int, p: float) -> None:
        if p > 0 and self.rg[x]:
            self.save(out + ".mask", numel * (self.e if self.device == "cpu" else 1))
        self.rg[out] = self.rg[x]

    def add(self, a: str, b: str, out: str) -> None:
        self.rg[out] = self.rg[a] or self.rg[b]

    def adapter(self, h: str, out: str, m: int, d: int, size: int, act: str) -> None:
        """Serial bottleneck: out = h + W_up f(W_down h + b) + b (W_down, W_up train)."""
        e = self.e
        self.save(h, m * d * e)
        self.save(out + ".act", m * size * e)
        if act not in ("relu", "tanh"):
            self.save(out + ".pre", m * size * e)
        self.gemm += m * size * e + m * d * e
        self.rg[out] = True

    def attention(
        self, q, k, v, out, b, s, S, heads, kv, hd, math: bool, p: float, mask: bool = False
    ) -> None:
        """SDPA; with an explicit mask (prefix) transformers repeats the KV heads and the kernel keeps the mask."""
        e = self.e
        if mask:
            kv = heads
            if not math and (self.rg[q] or self.rg[k] or self.rg[v]):
                self.save(out + ".mask", s * S * 4)
        qb, kb, pb = b * heads * s * hd * e, b * kv * S * hd * e, b * heads * s * S * e
        rq, rk, rv = self.rg[q], self.rg[k], self.rg[v]
        self.rg[out] = rq or rk or rv
        if math:
            if rk:
                self.save(q + ".scaled", qb)
            if rq:
                self.save(k + ".scaled", kb)
            scores_rg = rq or rk
            if scores_rg:
                self.save(out + ".probs", pb)
                if p > 0:
                    self.save(out + ".mask", b * heads * s * S * (e if self.device == "cpu" else 1))
            if rv:
                self.save(out + (".dropped" if p > 0 else ".probs"), pb)
            if scores_rg:
                self.save(v, kb)
            self.gemm += pb + qb
        else:
            if self.rg[out]:
                for name, nbytes in ((q, qb), (k, kb), (v, kb), (out, qb), (out + ".lse", b * heads * s * 4)):
                    self.save(name, nbytes)
            self.gemm += qb + b * heads * s * 4

    def total(self) -> int:
        return sum(self.saved.values())


def _geometry(cfg):
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, hd


def block_cost(
    counts, layer: int, x_rg: bool, b: int, s: int, e: int, device: str, act: str = "relu"
) -> BlockCost:
    """Saved bytes of block ``layer`` for a (b, s) batch (module docstring); ``x_rg``: its input requires grad."""
    cfg, lin, sites = counts.config, counts.blocks[layer], counts.adapter_sites[layer]
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads, kv, hd = _geometry(cfg)
    m, S = b * s, s + counts.prefix_tokens
    g = Graph(e, device)
    g.rg["x"] = x_rg
    prefix = counts.prefix_tokens > 0
    if counts.family == "llama":
        p_attn = getattr(cfg, "attention_dropout", 0.0) or 0.0
        g.rms("x", "n1", m, h, counts.norms_train)
        for role, name in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")):
            g.linear("n1", name, lin[role], m)
        if prefix:
            g.rg["k"] = g.rg["v"] = True
        g.attention(
            "q", "k", "v", "ao", b, s, S, heads, kv, hd, device == "cpu" and p_attn > 0, p_attn, prefix
        )
        g.linear("ao", "o", lin["self_attn.o_proj"], m)
        if "attn" in sites:
            g.adapter("o", "o", m, h, sites["attn"], act)
        g.add("x", "o", "x2")
        g.rms("x2", "n2", m, h, counts.norms_train)
        g.linear("n2", "gate", lin["mlp.gate_proj"], m)
        g.linear("n2", "up", lin["mlp.up_proj"], m)
        g.act("silu", "gate", "sg", m * inter)
        g.mul("sg", "up", "prod", m * inter)
        g.linear("prod", "down", lin["mlp.down_proj"], m)
        if "ffn" in sites:
            g.adapter("down", "down", m, h, sites["ffn"], act)
        transient = (2 * m * h + 2 * m * inter) * e  # dY, dX and two (M, I) gradients of the gated MLP
    else:  # bert: post-norm, GELU MLP, dropout
        p_h = getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0
        p_a = getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0
        for role, name in (("query", "q"), ("key", "k"), ("value", "v")):
            g.linear("x", name, lin[f"attention.self.{role}"], m)
        if prefix:
            g.rg["k"] = g.rg["v"] = True
        math = device == "cpu" and p_a > 0
        g.attention("q", "k", "v", "ctx", b, s, S, heads, kv, hd, math, p_a)
        g.linear("ctx", "ao", lin["attention.output.dense"], m)
        if "attn" in sites:
            g.adapter("ao", "ao", m, h, sites["attn"], act)
        g.dropout("ao", "aod", m * h, p_h)
        g.add("aod", "x", "r1")
        g.layernorm("r1", "h1", m, h, counts.norms_train)
        g.linear("h1", "i", lin["intermediate.dense"], m)
        g.act("gelu", "i", "gi", m * inter)
        g.linear("gi", "o", lin["output.dense"], m)
        if "ffn" in sites:
            g.adapter("o", "o", m, h, sites["ffn"], act)
        g.dropout("o", "od", m * h, p_h)
        g.add("od", "h1", "r2")
        g.layernorm("r2", "out", m, h, counts.norms_train)
        # dY, dX and the larger of the MLP's two (M, I) gradients and the math attention's two (B, heads, T, S) ones
        transient = (2 * m * h + max(2 * m * inter, 2 * b * heads * s * S if math else 0)) * e
    return BlockCost(saved=g.total(), gemm_outputs=g.gemm, input=m * h * e, transient=transient)


def embedding_rows(path: str, b: int, s: int) -> int:
    """Rows an input embedding looks up for a (b, s) batch: BERT's position table is looked up with (1, s) ids
    shared by the batch; word and token-type tables (and Llama's) with (b, s) ids."""
    return s if path.endswith("position_embeddings") else b * s


def embedding_cost(counts, b: int, s: int, e: int, device: str) -> tuple[int, bool]:
    """(saved bytes, output requires grad) of the embeddings."""
    cfg, m = counts.config, b * s
    g = Graph(e, device)
    g.rg["emb"] = counts.embeddings_train
    hook = getattr(counts.rules, "embedding_saved", None)
    if hook is not None and hook(g, counts, lambda path: embedding_rows(path, b, s)):
        g.rg["emb"] = True
    if counts.family == "bert":
        g.layernorm("emb", "ln", m, cfg.hidden_size, counts.norms_train)
        g.dropout("ln", "out", m * cfg.hidden_size, getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
        return g.total(), g.rg["out"]
    heads = cfg.num_attention_heads
    per = b if counts.prefix_tokens else 1  # prefix tuning passes (B, T) position ids: per-row cos, sin
    rotary = (
        2 * per * s * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) * e
    )  # cos, sin (q·cos, ...)
    return g.total() + rotary, g.rg["emb"]


def head_cost(counts, x_rg: bool, b: int, s: int, e: int, device: str) -> int:
    """Saved bytes after the last block up to the logits (the loss itself: :func:`peftlab.estimate`)."""
    m, h = b * s, counts.config.hidden_size
    g = Graph(e, device)
    g.rg["x"] = x_rg
    hook = getattr(counts.rules, "head_saved", None)
    if counts.family == "llama":
        g.rms("x", "nf", m, h, counts.norms_train)
        if hook is not None:
            hook(g, counts, "nf", lambda path: embedding_rows(path, b, s))
        if counts.head_trains:
            g.save(
                "nf", m * h * e
            )  # the head's dW needs its input (unfused loss; the fused one keeps dW itself)
        return g.total()
    pooler = counts.other.get("bert.pooler.dense")
    if pooler is not None and pooler.kind == "adapted":  # the method's rule on the B pooled rows (LoRA's xa, ...)
        g.linear("x", "pooler", pooler, b)
    if pooler is not None and pooler.kind != "frozen":
        g.save(
            "x", m * h * e
        )  # the pooler's input is a slice of the last hidden state: its whole storage stays
    pooled_rg = x_rg or (pooler is not None and pooler.kind != "frozen")
    # tanh output and dropout mask (if the pooled state requires grad), the classifier's input (if it trains)
    g.save("pooled", ((2 if pooled_rg else 0) + (1 if counts.head_trains else 0)) * b * h * e)
    return g.total()
