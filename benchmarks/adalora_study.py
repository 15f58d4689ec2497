"""AdaLoRA vs LoRA, and peftlab's AdaLoRA vs HF PEFT's, under one recipe and the same seeds.

Every arm is one method + setting, trained on SST-2 (MiniLM-L6) for the same number of steps with the
same data order per seed, best dev checkpoint kept, scored on the 872 test sentences; records carry
per-example test columns, so ``python -m peftlab.bench.report OUT`` gives paired-bootstrap Δs.

Arms (3 seeds each, run seed-major so that a time budget cut leaves whole seed rounds):

* ``lora``: LoRA r=8 on query/value, lr 1e-3 (the reference recipe of full.yaml);
* ``adalora`` / ``hf-adalora`` at lr 2e-3 (full.yaml's AdaLoRA) and 1e-2: the same configuration
  through peftlab and through HF PEFT (init_r 12 -> target_r 8, alpha 16, t_init 10%, t_final 30%,
  delta_t 10, orth_reg_weight 0.1): an implementation fault shows as a resolved difference between
  the two at the same setting, a recipe fault as both trailing LoRA alike;
* orth_reg_weight 0 and 0.5 (the default) at lr 1e-2, through both;
* no pruning (init_r = target_r = 8): the SVD parametrisation alone, without the budget schedule;
* P, Q initialised orthonormal (Λ still 0) at lr 2e-3: is the small N(0, 0.02) init + zero Λ what
  makes AdaLoRA slow to start?

python benchmarks/adalora_study.py --model DIR --data DIR --out DIR [--steps 600] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SCHEDULE = {"t_init": "10%", "t_final": "30%", "delta_t": 10}
ADA = {"init_r": 12, "target_r": 8, "alpha": 16, **SCHEDULE}
ARMS = [  # (label, method, params, lr)
    ("lora", "lora", {"r": 8, "alpha": 16, "dropout": 0.05}, 1e-3),
    ("adalora lr=2e-3", "adalora", {**ADA, "orth_reg_weight": 0.1}, 2e-3),
    ("hf-adalora lr=2e-3", "hf-adalora", {**ADA, "orth_reg_weight": 0.1}, 2e-3),
    ("adalora lr=1e-2", "adalora", {**ADA, "orth_reg_weight": 0.1}, 1e-2),
    ("hf-adalora lr=1e-2", "hf-adalora", {**ADA, "orth_reg_weight": 0.1}, 1e-2),
    ("adalora lr=1e-2 orth=0", "adalora", {**ADA, "orth_reg_weight": 0.0}, 1e-2),
    ("hf-adalora lr=1e-2 orth=0", "hf-adalora", {**ADA, "orth_reg_weight": 0.0}, 1e-2),
    ("adalora lr=1e-2 orth=0.5", "adalora", {**ADA, "orth_reg_weight": 0.5}, 1e-2),
    ("hf-adalora lr=1e-2 orth=0.5", "hf-adalora", {**ADA, "orth_reg_weight": 0.5}, 1e-2),
    ("adalora lr=1e-2 no-pruning", "adalora", {**ADA, "init_r": 8, "orth_reg_weight": 0.1}, 1e-2),
    ("adalora lr=2e-3 PQ-orthonormal", "adalora", {**ADA, "orth_reg_weight": 0.1, "init": "orthonormal"}, 2e-3),
    ("hf-adalora lr=2e-3 PQ-orthonormal", "hf-adalora", {**ADA, "orth_reg_weight": 0.1, "init": "orthonormal"}, 2e-3),
]


@torch.no_grad()
def orthonormal_init(model: torch.nn.Module) -> None:
    """Replace AdaLoRA's P (lora_B, d_out×r) and Q (lora_A, r×d_in) by orthonormal columns / rows."""
    for name, p in model.named_parameters():
        if "lora_A" in name and p.dim() == 2:
            q, _ = torch.linalg.qr(torch.randn(p.shape[1], p.shape[0], device=p.device))
            p.copy_(q.t())
        elif "lora_B" in name and p.dim() == 2:
            q, _ = torch.linalg.qr(torch.randn(p.shape[0], p.shape[1], device=p.device))
            p.copy_(q)


def install_providers() -> None:
    """hf-adalora with orth_reg_weight mapped, and an ``init`` knob for both AdaLoRAs."""
    from peftlab.bench import providers

    peftlab_adalora = providers.PROVIDERS["adalora"]

    def adalora(model, params, ctx):
        params = dict(params)
        init = params.pop("init", None)
        model = peftlab_adalora(model, params, ctx)
        if init == "orthonormal":
            orthonormal_init(model)
        return model

    def hf_adalora(model, params, ctx):
        import peft

        params = dict(params)
        init = params.pop("init", None)
        cfg = peft.AdaLoraConfig(
            task_type="SEQ_CLS",
            init_r=params.pop("init_r"),
            target_r=params.pop("target_r"),
            lora_alpha=params.pop("alpha"),
            tinit=params.pop("t_init"),
            tfinal=params.pop("t_final"),
            deltaT=params.pop("delta_t"),
            orth_reg_weight=params.pop("orth_reg_weight"),
            total_step=ctx["total_steps"],
            target_modules=["query", "value"],
        )
        assert not params, params
        model = peft.get_peft_model(model, cfg)
        if init == "orthonormal":
            orthonormal_init(model)
        return model

    providers.PROVIDERS["adalora"] = adalora
    providers.PROVIDERS["hf-adalora"] = hf_adalora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--arms", type=int, nargs="*", help="indices into ARMS (default: all)")
    args = parser.parse_args()

    import peftlab.util.models
    from peftlab.bench import worker

    load = peftlab.util.models.load_model
    peftlab.util.models.load_model = lambda *a, **k: load(*a, **{**k, "dtype": torch.float32})
    install_providers()
    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, longest = time.perf_counter(), 0.0
    arms = [ARMS[i] for i in args.arms] if args.arms else ARMS
    for seed in args.seeds:
        for label, method, params, lr in arms:
            if time.perf_counter() - start + 1.2 * longest > args.budget_s:
                print(f"budget reached: stopping before {label} seed {seed}", flush=True)
                return
            spec = {
                "sweep": "adalora-study",
                "model": args.model,
                "task": "sst2",
                "method": method,
                "label": label,
                "params": params,
                "train": {
                    "max_steps": args.steps,
                    "batch_size": 32,
                    "lr": lr,
                    "max_length": 64,
                    "eval_every": min(200, args.steps),
                    "dev_limit": 1000,
                    "eval_batch_size": 256,
                    "progress": False,
                },
                "seed": seed,
                "data": args.data,
            }
            spec["run_id"] = f"{label.replace(' ', '_')}-s{seed}"
            t0 = time.perf_counter()
            try:
                record = {**spec, **worker.run(spec)}
            except Exception as exc:  # noqa: BLE001 - recorded, the study goes on
                record = {**spec, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            longest = max(longest, time.perf_counter() - t0)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            metric = record.get("test", {}).get("accuracy")
            print(f"{label:38s} seed {seed}: test {metric} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
