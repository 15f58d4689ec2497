r"""Training-step efficiency: peftlab LoRA vs HF PEFT LoRA vs the floors, interleaved rounds, same run.

    python benchmarks/efficiency.py [--model smollm2-135m llama-672m] [--rounds 3] [--steps 5]
        [--configs floor-r0 hf-peft-lora peftlab-lora] [--device cpu|cuda] [--dtype fp32|bf16]
        [--out benchmarks/results/efficiency]

**Rounds.** Every configuration runs in its own fresh process (peak memory is per process), and the
configurations are interleaved: round 1 runs A B C, round 2 runs A B C again, and so on (≥ 3 rounds).
Each process takes ``--steps`` AdamW steps on one fixed batch after one warm-up step and reports its
median step. A ratio (e.g. peftlab / HF PEFT) is formed *within* each round, where both ran under the
same machine load, and the table gives its median and spread (min–max) over the rounds; the 1-minute
load average at the start and end of every round is listed beside it.

**Floors.** ``floor-r0`` is peftlab's own LoRA path with every rank set to 0: the same autograd
functions, the same saved tensors and the same dX products, minus the LoRA term (and the A/B grads of
rank-0 matrices). That bounds what any adapter step must pay in this library. ``floor-torch`` is the
plain-torch reference: the frozen model, forward and input-gradient backward through ``nn.Linear``
(the embeddings' output requires grad), no adapter at all.

**Rows** are registered with :func:`register_config` (name → builder); ``--configs`` picks them, so a
new method (e.g. DoRA) adds a row with one decorated function.

**Models.** SmolLM2-135M (causal LM, 8×128 tokens), MiniLM-L6 (sequence classification, 32×64), and a
synthetic Llama of 672M parameters (hidden 2048, 12 layers, intermediate 5632, 16 query / 4 KV
heads, vocab 32000; 2×128 tokens): random weights saved once as safetensors under
``$PEFTLAB_CACHE`` (outside the repository) and memory-mapped from there. ``llama-tiny`` is the same
recipe at toy size (``--dry-run`` and tests). LoRA r=16 on all linear layers everywhere.

Memory: on a CPU the process's peak RSS (model load included) and the peak during training alone
(VmHWM reset after setup); on CUDA ``torch.cuda.max_memory_allocated``. Writes efficiency.md,
efficiency.json and efficiency.png (device, date and command included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency_report import EXACT_MMAP_THRESHOLD, markdown, plot, summarize  # noqa: E402

LLAMA_672M = {
    "hidden_size": 2048, "num_hidden_layers": 12, "intermediate_size": 5632, "num_attention_heads": 16,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip
LLAMA_TINY = {
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": False,
}  # fmt: skip
#: SmolLM2-135M's shapes with random weights: the same step time and memory as the real model, for a
#: machine where the packaged model cannot be carried (only the loss values differ).
SMOLLM2_SHAPES = {
    "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}  # fmt: skip
SETUPS = {
    "smollm2-135m": {"kind": "causal-lm", "batch": 8, "length": 128, "targets": "all-linear"},
    "minilm-l6": {"kind": "seq-cls", "batch": 32, "length": 64, "targets": "all-linear"},
    "llama-672m": {
        "kind": "causal-lm",
        "batch": 2,
        "length": 128,
        "targets": "all-linear",
        "synthetic": LLAMA_672M,
    },
    "smollm2-135m-random": {
        "kind": "causal-lm",
        "batch": 8,
        "length": 128,
        "targets": "all-linear",
        "synthetic": SMOLLM2_SHAPES,
    },
    "llama-tiny": {
        "kind": "causal-lm",
        "batch": 2,
        "length": 16,
        "targets": "all-linear",
        "synthetic": LLAMA_TINY,
    },
}
DEFAULT_MODELS = ["smollm2-135m", "minilm-l6", "llama-672m"]
RANK = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: name -> builder(model_name, setup, args) -> model ready to train; see register_config
CONFIGS: dict[str, dict] = {}


def register_config(name: str, models=None, default: bool = True):
    """Register a row: ``builder(model_name, setup, opts) -> model`` (frozen base + trainable parts).

    ``models``: model kinds it applies to (None: all); ``default``: part of the default ``--configs``.
    The builder loads the model itself (:func:`load_base`), so that e.g. a quantized loader can differ.
    """

    def deco(fn):
        CONFIGS[name] = {"build": fn, "kinds": models, "default": default}
        return fn

    return deco


# ---- models ---------------------------------------------------------------------------------------


def synthetic_dir(name: str, spec: dict) -> Path:
    """A random Llama saved once as safetensors under the peftlab cache (atomic: temp dir + rename)."""
    from peftlab.util.models import cache_dir, save_folder_atomically

    target = cache_dir() / f"synthetic-{name}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(**spec)
    model = LlamaForCausalLM(config).to(torch.float32)
    return save_folder_atomically(target, model.save_pretrained)  # safetensors


def model_path(model_name: str) -> str:
    setup = SETUPS[model_name]
    if "synthetic" in setup:
        return str(synthetic_dir(model_name, setup["synthetic"]))
    import peftlab

    return peftlab.resolve_model_path(model_name)


def load_base(model_name: str, setup: dict, opts: dict):
    """The model in fp32 (or ``--dtype``), memory-mapped from safetensors; dropout off; on ``--device``."""
    from peftlab.util.models import auto_class

    kwargs = {"num_labels": 2} if setup["kind"] == "seq-cls" else {}
    torch.manual_seed(0)  # a new classifier head gets the same init in every config
    model = auto_class(setup["kind"]).from_pretrained(model_path(model_name), dtype=opts["dtype"], **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    return model.to(opts["device"])


def heads(setup: dict):
    return ["classifier"] if setup["kind"] == "seq-cls" else None


def peftlab_lora(model, setup: dict, opts: dict):
    import peftlab

    torch.manual_seed(1)
    peftlab.wrap(
        model,
        peftlab.LoraConfig(r=RANK, alpha=2 * RANK, dropout=opts["lora_dropout"], target_modules=setup["targets"],
                           modules_to_save=heads(setup)),
    )  # fmt: skip
    return model


@register_config("floor-r0")
def _floor_r0(model_name, setup, opts):
    """peftlab's LoRA path with every rank 0: the same autograd functions minus the LoRA term."""
    model = peftlab_lora(load_base(model_name, setup, opts), setup, opts)
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            shape = list(param.shape)
            shape[0 if "lora_A" in name else 1] = 0
            param.data = param.data.new_empty(shape)  # rank 0, still requires grad
    return model


@register_config("floor-torch")
def _floor_torch(model_name, setup, opts):
    """No adapter: forward + input-gradient backward through the frozen nn.Linear model."""
    model = load_base(model_name, setup, opts)
    model.requires_grad_(False)
    model.peftlab_bench_embeds = True  # the worker feeds inputs_embeds that require grad
    return model


@register_config("full", models=("causal-lm", "seq-cls"))
def _full(model_name, setup, opts):
    return load_base(model_name, setup, opts)


@register_config("hf-peft-lora")
def _hf_peft_lora(model_name, setup, opts):
    import peft

    model = load_base(model_name, setup, opts)
    torch.manual_seed(1)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=opts["lora_dropout"], target_modules=setup["targets"],
                        task_type="SEQ_CLS" if heads(setup) else "CAUSAL_LM"),
    )  # fmt: skip
    match_lora_init(model)
    return model


@register_config("peftlab-lora")
def _peftlab_lora(model_name, setup, opts):
    model = peftlab_lora(load_base(model_name, setup, opts), setup, opts)
    match_lora_init(model)
    return model


@register_config("peftlab-lora-sac")
def _peftlab_lora_sac(model_name, setup, opts):
    from peftlab.training.memory import enable_gradient_checkpointing

    return enable_gradient_checkpointing(_peftlab_lora(model_name, setup, opts), selective=True)


@register_config("peftlab-lora-ckpt")
def _peftlab_lora_ckpt(model_name, setup, opts):
    from peftlab.training.memory import enable_gradient_checkpointing

    return enable_gradient_checkpointing(_peftlab_lora(model_name, setup, opts), selective=False)


@register_config("peftlab-qlora", models=("causal-lm",))
def _peftlab_qlora(model_name, setup, opts):
    """NF4 + double quantization through peftlab.load_quantized (fp32 embeddings, norms, head)."""
    import peftlab

    model = peftlab.load_quantized(
        model_path(model_name), bits=4, quant_type="nf4", double_quant=True, device=opts["device"],
        dtype=opts["dtype"],
    )  # fmt: skip
    model = peftlab_lora(model, setup, opts)
    match_lora_init(model)
    return model


@register_config("hf-peft-qlora", models=("causal-lm",), default=False)
def _hf_peft_qlora(model_name, setup, opts):
    """The peer's QLoRA recipe: transformers' BitsAndBytesConfig (NF4 + double quant, compute in --dtype),
    ``prepare_model_for_kbit_training`` without checkpointing (fp32 embeddings, norms and head, as
    peftlab-qlora), HF PEFT LoRA r=16 on the same targets."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=opts["dtype"])  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_path(model_name), quantization_config=quant, dtype=opts["dtype"], device_map={"": opts["device"]}
    )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=opts["lora_dropout"], target_modules=setup["targets"],
                        task_type="CAUSAL_LM"),
    )  # fmt: skip
    match_lora_init(model)
    return model


@register_config("peftlab-dora", default=False)
def _peftlab_dora(model_name, setup, opts):
    """DoRA: LoRA's fused path + thin-product column norm (peftlab.methods.lora.dora)."""
    import peftlab

    model = load_base(model_name, setup, opts)
    torch.manual_seed(1)
    peftlab.wrap(
        model,
        peftlab.LoraConfig(r=RANK, alpha=2 * RANK, dropout=opts["lora_dropout"], target_modules=setup["targets"],
                           modules_to_save=heads(setup), use_dora=True),
    )  # fmt: skip
    match_lora_init(model)
    return model


@register_config("hf-peft-dora", default=False)
def _hf_peft_dora(model_name, setup, opts):
    import peft

    model = load_base(model_name, setup, opts)
    torch.manual_seed(1)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=opts["lora_dropout"], target_modules=setup["targets"],
                        task_type="SEQ_CLS" if heads(setup) else "CAUSAL_LM", use_dora=True),
    )  # fmt: skip
    match_lora_init(model)
    return model


def match_lora_init(model: torch.nn.Module) -> None:
    """Give every LoRA A the same values in peftlab and HF PEFT (seeded by its module path); B stays 0.

    HF PEFT and peftlab draw their random A in different orders, so without this only the first-step
    loss (where B = 0) could be compared; with it, the whole loss trajectory must agree.
    """
    import zlib

    for name, param in model.named_parameters():
        if "lora_A" not in name:
            continue
        path = name.removeprefix("base_model.model.").split(".lora_A")[0]
        gen = torch.Generator().manual_seed(zlib.crc32(path.encode()))
        flat = param.data.reshape(-1, param.shape[-1]) if param.dim() == 2 else param.data
        flat.copy_((torch.randn(flat.shape, generator=gen) / flat.shape[-1] ** 0.5).to(flat.dtype))


# ---- one process: one configuration -------------------------------------------------------------------


def _proc_status() -> dict[str, float]:
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError):
        return {}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_batch(model, setup: dict, device) -> dict:
    """The fixed training batch of a setup (seeded): token ids, mask, labels (or input embeddings for the
    plain-torch floor, whose frozen model would otherwise need no backward at all)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (setup["batch"], setup["length"]), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = (
        ids.clone() if setup["kind"] == "causal-lm" else torch.randint(0, 2, (setup["batch"],), device=device)
    )
    if getattr(model, "peftlab_bench_embeds", False):
        embeds = model.get_input_embeddings()(batch.pop("input_ids")).detach().requires_grad_()
        batch["inputs_embeds"] = embeds
    return batch


def make_loss_fn(model, config: str, setup: dict, batch: dict):
    """peftlab rows of causal LMs use the fused chunked LM loss (no full logits); HF PEFT and full use model(**batch)."""
    if not config.startswith("hf-peft") and config != "full" and setup["kind"] == "causal-lm":
        from peftlab.training.losses import causal_lm_loss

        return lambda: causal_lm_loss(model, batch)
    return lambda: model(**batch).loss


def worker(model_name: str, config: str, opts: dict) -> dict:
    setup = SETUPS[model_name]
    device = torch.device(opts["device"])
    cuda = device.type == "cuda"
    model = CONFIGS[config]["build"](model_name, setup, opts)
    for module in model.modules():  # no dropout: the loss trajectories must be comparable across configs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = make_batch(model, setup, device)
    model.train()
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_gpu = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    loss_fn = make_loss_fn(model, config, setup, batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    load_avg = os.getloadavg()[0]
    times, losses = [], []
    for _ in range(opts["steps"] + 1):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = statistics.median(times[1:])
    status = _proc_status()
    return {
        "model": model_name,
        "config": config,
        "median_step_s": step,
        "step_times_s": times,
        "tokens_per_s": setup["batch"] * setup["length"] / step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mb": status.get("VmHWM") if reset else None,
        "rss_after_load_mb": load_rss,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "gpu_after_load_mb": load_gpu,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "trainable": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_avg_start": load_avg,
        "load_avg_end": os.getloadavg()[0],
        "steps": opts["steps"],
    }


# ---- the parent: interleaved rounds, ratios, table ------------------------------------------------------


def applicable(model_name: str, config: str) -> bool:
    kinds = CONFIGS[config]["kinds"]
    return kinds is None or SETUPS[model_name]["kind"] in kinds


def run_rounds(args, on_round=None) -> tuple[list[dict], list[dict]]:
    """All (model, config) processes, interleaved over ``args.rounds`` rounds; (rows, rounds info).

    ``on_round(rows, rounds)`` runs after every round (the tables are rewritten, so a run cut short keeps
    its finished rounds)."""
    from tqdm import tqdm

    only = getattr(args, "only", None) or {}
    jobs = [(m, c) for m in args.model for c in args.configs if applicable(m, c) and c in only.get(m, [c])]
    for model_name in args.model:  # synthetic weights are written once, before any timing
        if "synthetic" in SETUPS[model_name]:
            synthetic_dir(model_name, SETUPS[model_name]["synthetic"])
    rows, rounds = [], []
    bar = tqdm(total=len(jobs) * args.rounds, desc="efficiency", file=sys.stderr)
    for index in range(args.rounds):
        info = {"round": index + 1, "load_avg_start": os.getloadavg(), "started": time.strftime("%H:%M:%S")}
        for model_name, config in jobs:
            cmd = [sys.executable, __file__, "--worker", model_name, config, "--steps", str(args.steps),
                   "--lora-dropout", str(args.lora_dropout), "--device", args.device, "--dtype", args.dtype]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                out, err, code = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out, err, code = "", f"timed out after {args.timeout} s: {exc}", -1
            if code == 0:
                row = json.loads(out.strip().splitlines()[-1])
            else:
                row = {"model": model_name, "config": config, "error": err.strip()[-1500:] or f"exit {code}"}
                print(f"[{model_name} {config}] failed:\n{row['error']}", file=sys.stderr)
            row["round"] = index + 1
            rows.append(row)
            bar.update()
        info["load_avg_end"] = os.getloadavg()
        rounds.append(info)
        if on_round is not None:
            on_round(rows, rounds)
    if args.device == "cpu" and args.exact_memory:
        for model_name, config in tqdm(jobs, desc="exact-allocator memory", file=sys.stderr):
            row = _exact_memory_row(args, model_name, config)
            if row is not None:
                rows.append(row)
        if on_round is not None:
            on_round(rows, rounds)
    bar.close()
    return rows, rounds


def _exact_memory_row(args, model_name: str, config: str) -> dict | None:
    """Peak RSS of one untimed step in a process whose large blocks are mmapped (freed = returned at once).

    glibc keeps freed heap blocks (its dynamic mmap threshold grows to 32 MiB after the first frees), so a
    plain process's peak RSS also counts blocks freed earlier in the step: allocation-order noise that
    differs between libraries. With a fixed 1 MiB threshold the RSS follows the live tensors (plus the
    memory-mapped weights), the CPU analogue of ``torch.cuda.max_memory_allocated``; it costs time
    (fresh pages are zeroed), so only this untimed pass uses it.
    """
    cmd = [sys.executable, __file__, "--worker", model_name, config, "--steps", "1",
           "--lora-dropout", str(args.lora_dropout), "--device", args.device, "--dtype", args.dtype]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(EXACT_MMAP_THRESHOLD)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": model_name, "config": config, "pass": "exact", "peak_rss_mb": row["peak_rss_mb"]}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=DEFAULT_MODELS, choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--configs", nargs="*", default=None, help=f"rows (default: all registered): {list(CONFIGS)}"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the base model")
    parser.add_argument("--out", default="benchmarks/results/efficiency")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="dropout on the LoRA input (both libraries); > 0 makes the losses differ (different masks)")  # fmt: skip
    parser.add_argument("--only", nargs="*", default=[], metavar="MODEL=CONFIG,CONFIG",
                        help="restrict a model to these rows (e.g. llama-672m=floor-r0,peftlab-lora: "
                        "the big model skips full fine-tuning)")  # fmt: skip
    parser.add_argument("--no-exact-memory", dest="exact_memory", action="store_false",
                        help="skip the untimed exact-allocator memory pass (CPU)")  # fmt: skip
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    opts = {
        "steps": args.steps,
        "lora_dropout": args.lora_dropout,
        "device": args.device,
        "dtype": DTYPES[args.dtype],
    }
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], opts)))
        return
    if args.configs is None:
        args.configs = [name for name, c in CONFIGS.items() if c["default"]]
    only = {}
    for item in args.only:
        model_name, _, names = item.partition("=")
        if model_name not in SETUPS or not names:
            parser.error(f"--only {item!r}: expected MODEL=CONFIG[,CONFIG...] with MODEL one of {', '.join(SETUPS)}")
        only[model_name] = names.split(",")
    args.only = only
    unknown = [c for c in args.configs + [c for names in only.values() for c in names] if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; registered: {', '.join(CONFIGS)}")
    cuda = args.device.startswith("cuda")
    memory_key, memory_label = (
        ("peak_gpu_mb", "peak GPU MiB (max allocated)") if cuda else ("peak_rss_mb", "peak RSS MB")
    )
    meta = {
        "device": device_name(args.device),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/efficiency.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "steps": args.steps,
        "dtype": args.dtype,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows, rounds):
        summary = summarize(rows, args.model, args.configs, memory_key)
        text = markdown({**meta, "rounds": len(rounds)}, summary, rounds, memory_label)
        for name, content in (
            (
                "efficiency.json",
                json.dumps({**meta, "summary": summary, "rounds": rounds, "rows": rows}, indent=1),
            ),
            ("efficiency.md", text),
        ):
            tmp = out / f".{name}.tmp"
            tmp.write_text(content)
            os.replace(tmp, out / name)
        return summary, text

    rows, rounds = run_rounds(args, on_round=write)
    summary, text = write(rows, rounds)
    plot(
        summary,
        out / "efficiency.png",
        f"step time vs peftlab's rank-0 floor, {meta['device']}, {meta['date']}",
    )
    print(text)


if __name__ == "__main__":
    main()
