peftlab train --model minilm-l6 --data reviews.csv --eval-split 0.1 --task classify --method lora --out out/classify
