import numpy as np
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
data = load_dataset("csv", data_files="reviews.csv")["train"].train_test_split(test_size=0.1, seed=0)
labels = sorted(set(data["train"]["label"]))
tokenizer = AutoTokenizer.from_pretrained(MODEL)


def encode(batch):
    encoded = tokenizer(batch["text"], truncation=True, max_length=128)
    encoded["labels"] = [labels.index(label) for label in batch["label"]]
    return encoded


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


data = data.map(encode, batched=True, remove_columns=["text", "label"])
model = AutoModelForSequenceClassification.from_pretrained(
    MODEL,
    num_labels=len(labels),
    id2label=dict(enumerate(labels)),
    label2id={n: i for i, n in enumerate(labels)},
)
model = get_peft_model(
    model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
)
args = TrainingArguments(
    "out/classify", num_train_epochs=1, learning_rate=1e-3, per_device_train_batch_size=16
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=data["train"],
    eval_dataset=data["test"],
    data_collator=DataCollatorWithPadding(tokenizer),
    compute_metrics=accuracy,
)
trainer.train()
print(trainer.evaluate())
model.save_pretrained("out/classify/adapter")
