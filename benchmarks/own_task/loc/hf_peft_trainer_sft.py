import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

MODEL = "HuggingFaceTB/SmolLM2-135M"
tokenizer = AutoTokenizer.from_pretrained(MODEL)


def encode(row):  # the loss on the response only: prompt positions get the label -100
    prompt = tokenizer(row["prompt"])["input_ids"]
    answer = tokenizer(" " + row["response"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [-100] * len(prompt) + answer,
    }


def collate(rows):
    width = max(len(row["input_ids"]) for row in rows)

    def pad(key, value):
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])

    return {"input_ids": pad("input_ids", tokenizer.pad_token_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}  # fmt: skip


data = load_dataset("json", data_files="qa.jsonl")["train"].train_test_split(test_size=0.1, seed=0)
data = data.map(encode, remove_columns=["prompt", "response"])
model = AutoModelForCausalLM.from_pretrained(MODEL)
model = get_peft_model(
    model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
)
args = TrainingArguments("out/sft", num_train_epochs=1, learning_rate=5e-4, per_device_train_batch_size=16)
trainer = Trainer(
    model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"], data_collator=collate
)
trainer.train()
print(trainer.evaluate())  # the eval loss; an exact-match score needs a generation loop of your own
model.save_pretrained("out/sft/adapter")
