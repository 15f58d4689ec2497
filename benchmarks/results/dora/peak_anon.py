import gc
import sys

import torch
from transformers import AutoModelForCausalLM

import peftlab
from peftlab.training.losses import causal_lm_loss


def st(k):
    return int(open('/proc/self/status').read().split(k + ':')[1].split()[0]) / 1024
dora = sys.argv[1] == "dora"
m = AutoModelForCausalLM.from_pretrained(peftlab.resolve_model_path("smollm2-135m"), dtype=torch.float32)
for p in m.parameters():
    p.data = p.data.clone()  # anonymous memory: no file-backed pages in the RSS
gc.collect()
torch.manual_seed(1)
peftlab.wrap(m, peftlab.LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=dora))
m.train()
ids = torch.randint(0, 49152, (8, 128))
batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
def step():
    causal_lm_loss(m, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()
gc.collect()
open('/proc/self/clear_refs', 'w').write('5')
base = st('VmRSS')
step()
print(sys.argv[1], "rss before step", round(base), "peak during step", round(st('VmHWM')), "increase", round(st('VmHWM') - base))
