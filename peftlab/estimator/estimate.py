r"""Know before you run: training memory and FLOPs of full fine-tuning, LoRA, QLoRA, AdaLoRA, adapters, prefix.

:func:`estimate` needs only a config (``AutoConfig``, a folder, a JSON file or a built-in name): parameters
are counted on the meta device (:mod:`peftlab.estimator.model`), activations op by op as our code saves them
(:mod:`peftlab.estimator.activations`). The peak is the largest of four moments of a steady-state step
(step ≥ 2: optimizer states exist), with W the weights (frozen + adapter), O the optimizer states, A_l the
bytes block l keeps for backward, G_l its parameter gradients, L the loss/logits transient::

    forward end     W + O + (G if grad_accum > 1) + Σ_l A_l + L_fwd
    loss backward   W + O + Σ_l A_l + L_bwd + G_head
    block l bwd     W + O + Σ_{i≤l} A_i + recompute_l + transient_l + Σ_{i≥l} G_i + G_head
    optimizer step  W + O + G + step temporaries (torch AdamW: one parameter's sqrt(v) on a CPU,
                    all of them at once with CUDA's foreach implementation)

Optimizer states: AdamW 2 moments in the parameter dtype; ``adamw8bit``/``paged_adamw8bit`` 2 bytes per
parameter plus fp32 absmax per 256 (tensors under 4096 elements keep 32-bit states); ``paged_*`` states
are counted in full and flagged pageable (CUDA can evict them to host memory).

FLOPs per step: 2·N per multiply-add of every GEMM (N tokens), forward + backward (2× for trained weights,
1× for the input gradient through frozen ones) + the recomputation of full checkpointing, × grad_accum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..core.registry import EstimateRules, registered_methods
from ..util.errors import ConfigError
from .activations import block_cost, embedding_cost, head_cost
from .model import DTYPES, QUANTS, count, default_kind, load_config

CHECKPOINTING = ("none", "full", "selective")
LOSSES = ("fused", "unfused")
_COUNTS: dict[tuple, Any] = {}
FUSED_CHUNK_LOGITS = 2**25  # peftlab.training.losses.fused_linear_cross_entropy's default chunk (logits per chunk)


@dataclass(frozen=True)
class Estimate:
    """Bytes (and FLOPs) of one training step; see the module docstring for how the peak is formed."""

    model_type: str
    method: str
    batch_size: int
    seq_len: int
    precision: str
    quant: str | None
    optimizer: str
    gradient_checkpointing: str
    grad_accum: int
    device: str
    total_params: int
    trainable_params: int
    frozen_weights: int
    adapter_weights: int
    gradients: int
    optimizer_states: int
    optimizer_paged: bool
    activations_per_block: tuple[int, ...]
    activations: int
    logits_loss_fused: int
    logits_loss_unfused: int
    loss: str
    phases: dict[str, int]
    total_peak: int
    flops_per_step: float

    @property
    def weights(self) -> int:
        return self.frozen_weights + self.adapter_weights

    @property
    def training_peak(self) -> int:
        """Peak minus the weights: what a step adds to a process that already holds the model."""
        return self.total_peak - self.weights

    @property
    def expected_process_peak(self) -> int | None:
        """Bytes the training process is expected to reach: runtime + weights + allocator slack × training peak,
        from measurements per device (:mod:`peftlab.estimator.process`); None where unmeasured (CUDA)."""
        from .process import expected_process_peak

        return expected_process_peak(self.device, self.weights, self.training_peak)

    @property
    def logits_loss(self) -> int:
        return self.logits_loss_fused if self.loss == "fused" else self.logits_loss_unfused

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "training_peak": self.training_peak,
            "expected_process_peak": self.expected_process_peak,
        }

    def table(self) -> str:
        """The breakdown as a plain-text table (MiB = 2²⁰ bytes)."""
        mib = 2**20
        blocks = self.activations_per_block
        paged = " (pageable)" if self.optimizer_paged else ""
        rows = [
            ("frozen weights" + (f" ({self.quant})" if self.quant else ""), self.frozen_weights),
            ("adapter weights", self.adapter_weights),
            ("gradients", self.gradients),
            (f"optimizer states ({self.optimizer}){paged}", self.optimizer_states),
            (
                f"activations: {len(blocks)} blocks × {max(blocks, default=0) / mib:,.1f} MiB + rest",
                self.activations,
            ),
            ("logits + loss, fused CE" + (" (used)" if self.loss == "fused" else ""), self.logits_loss_fused),
            (
                "logits + loss, unfused" + (" (used)" if self.loss == "unfused" else ""),
                self.logits_loss_unfused,
            ),
        ]
        rows += [(f"peak at {name}", v) for name, v in self.phases.items()]
        rows.append(("TOTAL PEAK (live tensors)", self.total_peak))
        expected = self.expected_process_peak
        if expected is not None:
            rows.append(("EXPECTED PROCESS PEAK", expected))
        width = max(len(r[0]) for r in rows)
        head = (
            f"{self.model_type} {self.method}: batch {self.batch_size} × "
            f"seq {self.seq_len}, {self.precision}, checkpointing {self.gradient_checkpointing}, "
            f"grad_accum {self.grad_accum}, {self.device}\n"
            f"trainable {self.trainable_params:,d} of {self.total_params:,d} parameters "
            f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%); "
            f"{self.flops_per_step / 1e12:,.2f} TFLOPs per step"
        )
        lines = [head, "-" * (width + 14)]
        lines += [f"{name:<{width}}  {v / mib:>10,.1f} MiB" for name, v in rows]
        from .process import describe

        lines.append(f"expected process peak: {describe(self.device)}")
        return "\n".join(lines)


def _method_of(config) -> tuple[str, EstimateRules | None]:
    """(method name, its estimate rules); ("full", None) for full fine-tuning."""
    if config is None or config == "full":
        return "full", None
    countable = [m for m in registered_methods() if m.estimate is not None]
    method = next((m for m in countable if isinstance(config, m.config_class)), None)
    if method is None:
        names = ", ".join(m.config_class.__name__ for m in countable)
        raise ConfigError(
            f"estimate() takes a peftlab config of {names}, or None / 'full' for full fine-tuning; "
            f"got {type(config).__name__}"
        )
    rules = method.estimate
    return method.name, rules.for_config(config) if rules.for_config is not None else rules


def _optimizer_bytes(name: str, numels: list[int], e: int) -> tuple[int, bool]:
    if name in ("adamw",):
        return sum(2 * n * e for n in numels), False
    if name in ("paged_adamw", "paged_adamw32bit"):
        return sum(8 * n for n in numels), True
    if name in ("adamw8bit", "paged_adamw8bit"):
        total = sum(2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 8 * n for n in numels)
        return total, name.startswith("paged")
    raise ConfigError(
        f"unknown optimizer {name!r}; valid: adamw, adamw8bit, paged_adamw, paged_adamw8bit, paged_adamw32bit"
    )


def _loss_bytes(counts, b: int, s: int, e: int) -> tuple[int, int, int]:
    """(fused peak, unfused peak, unfused extra at the loss backward) of the logits and the loss."""
    if counts.kind != "causal-lm":
        n_out = b * getattr(counts.config, "num_labels", 2) * (s if counts.kind == "token-cls" else 1)
        return 3 * n_out * 4, 3 * n_out * 4, 0
    vocab, h = counts.config.vocab_size, counts.config.hidden_size
    n = b * s
    n_shift = b * (s - 1)
    rows = min(n_shift, max(1, FUSED_CHUNK_LOGITS // vocab))
    # fused: chunk logits + logsumexp's temporary (fp32), grad_h and the shifted hidden copy (N', H)
    fused = 2 * rows * vocab * 4 + 2 * n_shift * h * e
    # unfused (transformers' loss): logits, their fp32 copy, log-softmax; backward: 3 (N, V) fp32 at once
    upcast = n * vocab * 4 if e < 4 else 0
    fwd = n * vocab * e + upcast + n * vocab * 4
    bwd = 3 * n * vocab * 4
    return fused, max(fwd, bwd), bwd


def estimate(
    model_or_path: Any,
    config=None,
    batch_size: int = 8,
    seq_len: int = 512,
    precision: str = "bf16",
    quant: str | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool | str = False,
    grad_accum: int = 1,
    *,
    kind: str | None = None,
    device: str = "cuda",
    loss: str = "fused",
    double_quant: bool = True,
    train_mode: bool = True,
) -> Estimate:
    """Memory breakdown (bytes) and FLOPs of one training step, without loading any weight.

    Args:
        model_or_path: a model, a transformers config, a local folder, a JSON config file, a peftlab short
            name (``minilm-l6``, ``smollm2-135m``) or a built-in hub id (``meta-llama/Meta-Llama-3-8B``, ...).
        config: ``peftlab.LoraConfig`` / ``AdaLoraConfig`` / ``AdapterConfig`` / ``PrefixConfig``, or None for
            full fine-tuning. QLoRA is a LoraConfig with ``quant="nf4"``.
        batch_size, seq_len: one micro-batch (B, T). grad_accum: micro-batches per optimizer step.
        precision: "fp32", "bf16" or "fp16" (weights and activations). quant: None, "nf4", "fp4", "int8".
        optimizer: a name of :data:`peftlab.training.memory.OPTIMIZERS`.
        gradient_checkpointing: False / "none", True / "full", or "selective".
        kind: "causal-lm", "seq-cls" or "token-cls" (default: causal-lm for decoders, seq-cls otherwise).
        device: "cuda" or "cpu" (dropout masks, attention kernels and optimizer temporaries differ).
        loss: "fused" (peftlab's chunked linear cross-entropy, our trainer's default for causal LMs) or
            "unfused" (transformers' loss on materialised logits); both are reported.
        train_mode: dropout active (model.train()).

    Raises:
        ConfigError: an unknown option, model type or method (the message lists what is valid).
    """
    if precision not in DTYPES:
        raise ConfigError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if quant not in QUANTS:
        raise ConfigError(f"quant must be None or one of {', '.join(q for q in QUANTS if q)}, got {quant!r}")
    ckpt = {False: "none", True: "full", None: "none"}.get(gradient_checkpointing, gradient_checkpointing)
    if ckpt not in CHECKPOINTING:
        raise ConfigError(
            f"gradient_checkpointing must be False, True, or one of {CHECKPOINTING}, got {ckpt!r}"
        )
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    method, rules = _method_of(config)
    if quant and (rules is None or not rules.quantized_base):
        able = ", ".join(m.name for m in registered_methods() if m.estimate is not None and m.estimate.quantized_base)
        raise ConfigError(f"quant={quant!r} needs a config of a method that trains on a quantized base ({able}); "
                          f"{method} trains on a float base")
    hf_config = load_config(model_or_path)
    if not train_mode:
        hf_config = type(hf_config).from_dict(
            {**hf_config.to_dict(), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
             "attention_dropout": 0.0}
        )  # fmt: skip
    kind = kind or default_kind(hf_config)
    e = torch.finfo(DTYPES[precision]).bits // 8
    key = (hf_config.to_json_string(), kind, method, repr(config), precision, quant, double_quant)
    counts = _COUNTS.get(key)
    if counts is None:
        counts = count(hf_config, kind, rules, None if rules is None else config, precision, quant, double_quant)
        _COUNTS.clear()  # keep the last one only: fit() calls estimate() with the same model many times
        _COUNTS[key] = counts
    b, s, n_layers = batch_size, seq_len, counts.n_layers
    act = rules.activation(config) if rules is not None and rules.activation is not None else "relu"

    # activations
    emb_saved, x_rg = embedding_cost(counts, b, s, e, device)
    blocks = []
    for layer in range(n_layers):
        blocks.append(block_cost(counts, layer, x_rg, b, s, e, device, act))
        x_rg = True if any(lin.kind != "frozen" for lin in counts.blocks[layer].values()) else x_rg
        x_rg = x_rg or bool(counts.adapter_sites[layer]) or counts.prefix_tokens > 0 or counts.norms_train
    kept = [blk.kept(ckpt) for blk in blocks]
    head_saved = head_cost(counts, x_rg, b, s, e, device)
    activations = emb_saved + sum(kept) + head_saved

    # weights, gradients, optimizer
    grads = counts.trainable_bytes
    in_model_dtype = rules is None or rules.params_in_model_dtype
    pe = e if in_model_dtype else (4 if quant or e < 4 else e)  # trainable parameter dtype
    opt_bytes, paged = _optimizer_bytes(optimizer, counts.trainable_numels, pe)
    largest = max(counts.trainable_numels, default=0) * pe
    step_temp = (largest if device == "cpu" else grads) if optimizer == "adamw" else 0
    weights = counts.frozen_bytes + counts.adapter_bytes

    # per-block gradients (trained weights inside blocks), the rest lands at the head / embeddings
    e_adapter = pe
    block_grads = [0] * n_layers
    for layer in range(n_layers):
        for lin in counts.blocks[layer].values():
            if lin.kind == "full":
                block_grads[layer] += lin.d_in * lin.d_out * e
            elif lin.kind == "adapted":
                block_grads[layer] += sum(lin.rules.linear_params(lin.r, lin.d_in, lin.d_out)) * e_adapter
        for size in counts.adapter_sites[layer].values():
            block_grads[layer] += 2 * size * counts.config.hidden_size * e_adapter
    grads_other = max(grads - sum(block_grads) - counts.late_grad_bytes, 0)  # head side: at the loss backward

    fused, unfused, unfused_bwd = _loss_bytes(counts, b, s, e)
    loss_mode = loss if kind == "causal-lm" else "unfused"
    logits = fused if loss_mode == "fused" else unfused
    if loss_mode == "fused" and counts.head_trains:
        logits += counts.head_params * 4  # the fused loss computes dW in its forward and keeps it
    dequant = counts.largest_quantized * e if quant else 0
    base = weights + opt_bytes
    accum_grads = grads if grad_accum > 1 else 0
    phases = {
        "forward end": base + accum_grads + activations + logits + dequant,
        "loss backward": base + activations + logits + grads_other,
    }
    running = emb_saved + sum(kept)
    after = grads_other
    peak_blocks = 0
    for layer in reversed(range(n_layers)):
        blk = blocks[layer]
        after += block_grads[layer]
        peak_blocks = max(peak_blocks, running + blk.recompute(ckpt) + blk.transient + after + dequant)
        running -= kept[layer]
    phases["block backward"] = base + max(peak_blocks, accum_grads)
    phases["optimizer step"] = base + grads + step_temp
    total = max(phases.values())

    flops = _flops(counts, b, s, method, ckpt) * grad_accum
    return Estimate(
        model_type=hf_config.model_type, method=method + ("+" + quant if quant else ""), batch_size=b,
        seq_len=s, precision=precision, quant=quant, optimizer=optimizer, gradient_checkpointing=ckpt,
        grad_accum=grad_accum, device=device, total_params=counts.total_params,
        trainable_params=counts.trainable_params, frozen_weights=counts.frozen_bytes,
        adapter_weights=counts.adapter_bytes, gradients=grads, optimizer_states=opt_bytes,
        optimizer_paged=paged, activations_per_block=tuple(kept), activations=activations,
        logits_loss_fused=fused, logits_loss_unfused=unfused, loss=loss_mode, phases=phases,
        total_peak=total, flops_per_step=flops,
    )  # fmt: skip


def _flops(counts, b: int, s: int, method: str, ckpt: str) -> float:
    """Forward + backward (+ recomputation) GEMM and attention FLOPs of one micro-batch."""
    cfg = counts.config
    n = b * s
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    causal = 0.5 if counts.family == "llama" else 1.0
    attn = 4 * b * s * (s + counts.prefix_tokens) * heads * hd * causal * counts.n_layers
    blocks = 2 * n * counts.matmul_params + attn
    head = 2 * n * counts.head_params
    extra = 0
    for layer in counts.blocks:
        for lin in layer.values():
            if lin.kind == "adapted":
                extra += 2 * n * lin.r * (lin.d_in + lin.d_out)
    for sites in counts.adapter_sites:
        extra += sum(4 * n * size * cfg.hidden_size for size in sites.values())
    fwd = blocks + head + extra
    if method == "full":
        bwd = 2 * fwd
    else:
        bwd = blocks + attn + head + 2 * extra  # dX through frozen GEMMs and attention, dX and dW of adapters
    recompute = blocks + extra if ckpt == "full" else 0
    return float(fwd + bwd + recompute)


def parse_size(text: str) -> int:
    """'24GB' -> 24·10⁹, '24GiB' -> 24·2³⁰, '800MB', '1.5G' (G = GiB), plain bytes."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if not m:
        raise ConfigError(f"cannot read a memory size from {text!r}; write e.g. 24GB, 24GiB, 800MB")
    value, unit, binary, byte = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    power = " KMGT".index(unit) if unit else 0
    base = 1024 if (binary or (unit and not byte)) else 1000
    return int(value * base**power)


def fit(budget: int, vary: str = "batch", limit: int = 1 << 20, **kwargs) -> tuple[int, Estimate | None]:
    """Largest ``batch_size`` (vary="batch") or ``seq_len`` (vary="seq") whose total peak fits ``budget`` bytes.

    kwargs go to :func:`estimate`. Returns (value, its estimate); (0, None) when even 1 does not fit.
    Doubling, then bisection (the peak grows monotonically with both).
    """
    if vary not in ("batch", "seq"):
        raise ConfigError(f"fit varies 'batch' or 'seq', got {vary!r}")
    key = "batch_size" if vary == "batch" else "seq_len"
    if "model_or_path" in kwargs:
        kwargs["model_or_path"] = load_config(kwargs["model_or_path"])

    def peak(value: int) -> Estimate:
        return estimate(**{**kwargs, key: value})

    best, best_est, lo = 0, None, 1
    est = peak(1)
    if est.total_peak > budget:
        return 0, None
    best, best_est, hi = 1, est, 2
    while hi <= limit:
        est = peak(hi)
        if est.total_peak > budget:
            break
        best, best_est, lo, hi = hi, est, hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        est = peak(mid)
        if est.total_peak <= budget:
            best, best_est, lo = mid, est, mid
        else:
            hi = mid
    return best, best_est
