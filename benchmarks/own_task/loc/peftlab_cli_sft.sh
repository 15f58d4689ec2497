peftlab train --model smollm2-135m --data qa.jsonl --eval-split 0.1 --task sft --method lora --r 16 --target all-linear --out out/sft
