from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

data = load_dataset("json", data_files="qa.jsonl")["train"].rename_column("response", "completion")
data = data.train_test_split(test_size=0.1, seed=0)
trainer = SFTTrainer(
    model="HuggingFaceTB/SmolLM2-135M",
    train_dataset=data["train"],
    eval_dataset=data["test"],
    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    args=SFTConfig("out/sft", num_train_epochs=1, learning_rate=5e-4, per_device_train_batch_size=16),
)
trainer.train()
print(trainer.evaluate())  # the eval loss; an exact-match score needs a generation loop of your own
trainer.save_model("out/sft/adapter")
