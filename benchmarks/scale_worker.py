r"""One process of ``benchmarks/scale.py``: one library's tasks (train steps, decode, kernel rows) in a row.

    python benchmarks/scale_worker.py '<json spec>'     # started by scale.py, never by hand

The spec names the library (``floor`` | ``peftlab`` | ``hf-peft`` | ``kernel``), the device, the dry-run
flag and a list of tasks; every finished task prints one line, "SCALE_ROW <json>", at once (so a process killed at its cap
keeps what it finished). Between tasks the model is freed and the CUDA peak is reset, so each train row's
``peak_mib`` (``torch.cuda.max_memory_allocated``) is that task's alone: the model's weights plus the
training step, measured from after the model was built.

Models are built here with random weights from the real configs (``MODELS`` in scale.py, passed in the
spec): ``torch.manual_seed(0)``, then ``LlamaForCausalLM(LlamaConfig(**cfg))`` constructed directly on the
device in bf16 (no file, no hub), so every process gets the same weights and the losses of two libraries
can be compared. LoRA A matrices are set from their module path (:func:`efficiency.match_lora_init`), B = 0.

Train task: ``batch`` × ``seq`` random tokens (seeded), AdamW (lr 1e-4) over the trainable parameters,
1 warm-up step (Triton autotuning, cuBLAS heuristics) then ``steps`` timed steps, each synchronised;
tokens/s = batch·seq / median step. Stops early (≥ 1 timed step) past the task's ``cap_s``.

Methods (LoRA r = 16, alpha 32, dropout 0, all linear layers but the head, in both libraries):

* ``floor`` (library ``peftlab``): no adapter; the frozen model, forward + input-gradient backward
  (the embedding output requires grad), peftlab's loss; what any adapter step pays on top of;
* ``lora`` / ``dora``: ``peftlab.wrap(model, LoraConfig(..., use_dora=...))`` vs
  ``peft.get_peft_model(model, peft.LoraConfig(...))``;
Checkpointing (``spec["checkpointing"]``, from scale.py's ``--ckpt-peftlab`` / ``--ckpt-hf``): none by default
(both fit an H200 at 2048 tokens); ``selective`` / ``full`` for peftlab (``peftlab.enable_gradient_checkpointing``),
``full`` for HF PEFT (transformers' ``gradient_checkpointing_enable``, non-reentrant); stated in ``settings``.

* ``qlora``: NF4 + double quantization (bitsandbytes, blocksize 64, compute bf16) of every linear but the
  head, non-quantized weights cast to fp32 (both libraries' QLoRA recipe: ``peftlab.quantize`` +
  ``peftlab.prepare_for_kbit_training`` vs bitsandbytes' ``Linear4bit`` swap + HF PEFT's
  ``prepare_model_for_kbit_training`` rule), no checkpointing.

peftlab rows compute the loss with peftlab's chunked LM head + cross-entropy (``peftlab.training.losses``, no
full logits) when it imports, else ``model(**batch).loss``; HF PEFT rows use ``model(**batch).loss``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
RANK, ALPHA = 16, 32


#: Prefix of the worker's result lines on stdout (anything else a library prints there is ignored).
MARK = "SCALE_ROW "


def emit(row: dict) -> None:
    print(MARK + json.dumps(row), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU (dry run): peak RSS, KiB → MiB


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def build_base(cfg: dict, device: str, dtype: torch.dtype):
    """A causal LM with random weights (seed 0) built on ``device`` in ``dtype``: nothing read from disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config.pad_token_id = 0
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    # no .to(dtype): the parameters are already in dtype, and the rotary inv_freq buffer stays fp32 (as
    # from_pretrained(dtype=...) leaves it)
    return model


def lora_config(method: str, library: str):
    if library == "peftlab":
        import peftlab

        return peftlab.LoraConfig(r=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear", use_dora=method == "dora")
    import peft

    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM", use_dora=method == "dora")  # fmt: skip


def hf_quantize_4bit(model, device: str, compute_dtype: torch.dtype):
    """Every ``nn.Linear`` but the output head → bitsandbytes ``Linear4bit`` (NF4, double quant, blocksize 64),
    as transformers' ``BitsAndBytesConfig`` loader does (and its flag ``is_loaded_in_4bit``, which HF PEFT reads
    to pick its bitsandbytes LoRA layer); then ``peft.prepare_model_for_kbit_training`` without checkpointing
    (everything frozen; non-4-bit float weights cast to fp32)."""
    import bitsandbytes as bnb
    import peft

    from peftlab.backends.quant.bnb_cpu_fix import ensure_correct_cpu_dequantize

    # the same right CPU kernel as peftlab's process (bitsandbytes 0.50's AVX-512 one reads wrong block scales on
    # rows that are not whole blocks, as the dry run's toy widths are; see bnb_cpu_fix)
    ensure_correct_cpu_dequantize()
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")  # fmt: skip
            q.weight = bnb.nn.Params4bit(child.weight.data.cpu() if device == "cpu" else child.weight.data,
                                         requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         blocksize=64).to(device)  # fmt: skip
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q)
    model.is_loaded_in_4bit = True
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_train(task: dict, spec: dict):
    """(model, loss_fn, settings) for one train task."""
    from efficiency import match_lora_init

    library, method, device = task["library"], task["method"], spec["device"]
    dtype = torch.float32 if spec["dry_run"] else torch.bfloat16
    model = build_base(task["config"], device, dtype)
    notes = [f"{'fp32 (dry run)' if spec['dry_run'] else 'bf16'} weights, random (seed 0)", "no checkpointing",
             "AdamW lr 1e-4", f"batch {task['batch']} x seq {task['seq']}"]  # fmt: skip
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the backward runs through every layer (input gradients only)
        notes.insert(0, "no adapter: frozen model, forward + input-gradient backward")
    elif method == "qlora":
        if library == "peftlab":
            import peftlab

            peftlab.quantize(model, bits=4, quant_type="nf4", double_quant=True, compute_dtype=dtype)
            peftlab.prepare_for_kbit_training(model, use_gradient_checkpointing=False)
            torch.manual_seed(1)
            peftlab.wrap(model, lora_config(method, library))
        else:
            import peft

            model = hf_quantize_4bit(model, device, dtype)
            torch.manual_seed(1)
            model = peft.get_peft_model(model, lora_config(method, library))
        notes.insert(0, "NF4 + double quant (bitsandbytes, blocksize 64), fp32 embeddings/norms/head; LoRA r=16 all-linear")
    else:
        torch.manual_seed(1)
        if library == "peftlab":
            import peftlab

            peftlab.wrap(model, lora_config(method, library))
        else:
            import peft

            model = peft.get_peft_model(model, lora_config(method, library))
        notes.insert(0, f"{'DoRA' if method == 'dora' else 'LoRA'} r=16 alpha=32 all-linear, dropout 0")
    if method != "floor":
        match_lora_init(model)
    ckpt = spec.get("checkpointing", {}).get(library, "none")
    if ckpt != "none" and method != "floor":
        if library == "peftlab":
            import peftlab

            peftlab.enable_gradient_checkpointing(model, selective=ckpt == "selective")
        else:  # transformers' own, as HF PEFT's docs use it (non-reentrant; inputs require grad)
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        notes[notes.index("no checkpointing")] = f"{ckpt} gradient checkpointing"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (task["batch"], task["seq"]), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss_fn = lambda: model(**batch).loss  # noqa: E731
    if library == "peftlab":
        try:
            from peftlab.training.losses import causal_lm_loss

            loss_fn = lambda: causal_lm_loss(model, batch)  # noqa: E731
            notes.append("peftlab chunked LM-head cross-entropy")
        except ImportError:
            notes.append("model(**batch).loss (peftlab.training.losses not found)")
        if method != "floor":
            notes.append("peftlab kernels: use_kernel=auto")
    else:
        notes.append("model(**batch).loss")
    return model, loss_fn, "; ".join(notes)


def run_train(task: dict, spec: dict) -> dict:
    device = spec["device"]
    reset_peak(device)
    # what a previous task left allocated (should be ~0: a leak would inflate this task's peak)
    before = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    t_build = time.perf_counter()
    model, loss_fn, settings = build_train(task, spec)
    build_s = time.perf_counter() - t_build
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    reset_peak(device)  # weights stay allocated: the peak counts them plus the step
    times, losses = [], []
    start = time.perf_counter()
    for index in range(task["steps"] + 1):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float()))
        if index >= 1 and time.perf_counter() - start > task["cap_s"]:
            break
    step = statistics.median(times[1:])
    row = {"kind": "train", "model": task["model"], "method": task["method"], "library": task["library"],
           "batch": task["batch"], "seq": task["seq"], "settings": settings,
           "tokens_per_s": task["batch"] * task["seq"] / step, "peak_mib": peak_mib(device),
           "losses": losses, "step_s": times, "build_s": build_s, "allocated_before_mib": before, "trainable": sum(p.numel() for p in trainable)}  # fmt: skip
    del model, opt, loss_fn, trainable
    reset_peak(device)
    return row


# ---- decode: a batch of rows, each with its own adapter (mixed batch) -----------------------------------------


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))


def run_decode(task: dict, spec: dict) -> dict:
    """tokens/s = B·(N − 1) / (t(generate N) − t(generate 1)): the prefill cancels (as multi_adapter.py)."""
    device, library, n = spec["device"], task["library"], task["adapters"]
    dtype = torch.float32 if spec["dry_run"] else torch.bfloat16
    model = build_base(task["config"], device, dtype)
    names = [f"a{m % n}" for m in range(task["batch"])]
    if library == "peftlab":
        import peftlab

        for i in range(n):
            peftlab.wrap(model, peftlab.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear", adapter_name=f"a{i}"))
    elif library == "hf-peft":
        import peft

        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
        model = peft.get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, n):
            model.add_adapter(f"a{i}", peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                       init_lora_weights=False))  # fmt: skip
    if library != "base":  # non-zero adapters, the same values in both libraries' parameter order per adapter
        for i in range(n):  # peftlab: "...lora_A.a3"; HF PEFT: "...lora_A.a3.weight"
            _randomize([p for name, p in model.named_parameters()
                        if "lora_" in name and name.removesuffix(".weight").endswith(f".a{i}")], seed=i)  # fmt: skip
    model.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, model.config.vocab_size, (task["batch"], task["prompt"]), generator=gen).to(device)
    kw = {"adapter_names": names} if library != "base" else {}

    @torch.no_grad()
    def generate(k: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                       do_sample=False, pad_token_id=0, **kw)  # fmt: skip
        sync(device)
        return time.perf_counter() - t0

    generate(2)  # warm-up
    deltas, start = [], time.perf_counter()
    for _ in range(task["repeats"]):
        deltas.append(generate(task["new_tokens"]) - generate(1))
        if time.perf_counter() - start > task["cap_s"]:
            break
    delta = max(statistics.median(deltas), 1e-9)
    row = {"kind": "decode", "model": task["model"], "adapters": n, "batch": task["batch"], "library": library,
           "tokens_per_s": task["batch"] * (task["new_tokens"] - 1) / delta, "deltas_s": deltas,
           "prompt": task["prompt"], "new_tokens": task["new_tokens"]}  # fmt: skip
    del generate
    model = None  # the closure's cell: frees the model before the next task
    reset_peak(device)
    return row


# ---- kernel rows: one linear, fwd + bwd ------------------------------------------------------------------


def _time(fn, device: str, repeats: int, cap_s: float) -> float:
    for _ in range(3):  # warm-up, Triton autotuning
        fn()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > cap_s:
            break
    return statistics.median(times)


def run_kernel(task: dict, spec: dict) -> dict:
    """base (frozen nn.Linear, dX only) vs peftlab's LoRA linear (default dispatch) vs HF PEFT's lora.Linear."""
    import peft

    import peftlab

    device = spec["device"]
    dtype = torch.float32 if spec["dry_run"] else torch.bfloat16
    tokens, d_in, d_out = task["tokens"], task["d_in"], task["d_out"]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, d_in, generator=gen).to(device, dtype).requires_grad_(True)
    grad = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    ours = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype))
    peftlab.wrap(ours, peftlab.LoraConfig(r=RANK, alpha=ALPHA, target_modules=["0"]))
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    hf = peft.get_peft_model(holder, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"])).base_model.model.lin
    for layer in (ours, hf):  # B ≠ 0, the same in both: the LoRA term is real work
        _randomize([p for name, p in layer.named_parameters() if "lora_B" in name], seed=3)
    row = {"kind": "kernel", "shape": f"{tokens}x{d_in}x{d_out}"}
    for key, layer in (("base_ms", base), ("peftlab_ms", ours), ("hf_peft_ms", hf)):
        row[key] = 1e3 * _time(lambda layer=layer: layer(x).backward(grad), device, task["repeats"], task["cap_s"])
        x.grad = None
    return row


RUNNERS = {"train": run_train, "decode": run_decode, "kernel": run_kernel}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["dry_run"]:
        torch.set_num_threads(1)
    if spec["device"].startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    for task in spec["tasks"]:
        t0 = time.perf_counter()
        try:
            row = RUNNERS[task["kind"]](task, spec)
        except Exception as exc:  # noqa: BLE001 - one failed task must not lose the others
            import traceback

            row = {"kind": task["kind"], "task": {k: v for k, v in task.items() if k != "config"},
                   "error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            reset_peak(spec["device"])
        row["seconds"] = time.perf_counter() - t0
        row["round"] = spec["round"]
        emit(row)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
