from peftlab.finetune import finetune

metrics = finetune(
    "smollm2-135m",
    "qa.jsonl",
    task="sft",
    method="lora",
    out="out/sft",
    eval_split=0.1,
    r=16,
    target_modules="all-linear",
)
print(metrics["eval"])
