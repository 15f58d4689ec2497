from peftlab.finetune import finetune

print(
    finetune("minilm-l6", "reviews.csv", task="classify", method="lora", out="out/classify", eval_split=0.1)[
        "eval"
    ]
)
