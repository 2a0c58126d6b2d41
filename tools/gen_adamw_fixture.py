"""AdamW reference for engine/tests/train_dpo.rs: torch.optim.AdamW with transformers' cosine-with-warmup
schedule and gradient-norm clipping on fixed gradients. Writes tests/fixtures/optim/adamw.json.
Run: source "$(tools/pyenv.sh)"; python tools/gen_adamw_fixture.py
"""
import json
import os

import torch
from transformers import get_cosine_schedule_with_warmup

torch.manual_seed(0)
shapes = {"a": (3, 5), "b": (4, 3)}
params = {k: torch.nn.Parameter(torch.randn(*s)) for k, s in shapes.items()}
init = {k: p.detach().clone().flatten().tolist() for k, p in params.items()}
opt = torch.optim.AdamW(list(params.values()), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
steps = []
for step in range(6):
    grads = {k: (torch.randn(*s) * (3.0 if step == 1 else 0.5)) for k, s in shapes.items()}
    for k, p in params.items():
        p.grad = grads[k].clone()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=1.0)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    steps.append({"grads": {k: g.flatten().tolist() for k, g in grads.items()}, "lr": lr, "grad_norm": float(norm),
                  "params": {k: p.detach().flatten().tolist() for k, p in params.items()}})
os.makedirs("tests/fixtures/optim", exist_ok=True)
with open("tests/fixtures/optim/adamw.json", "w") as f:
    json.dump({"shapes": shapes, "init": init, "lr": 0.05, "weight_decay": 0.1, "max_grad_norm": 1.0, "warmup": 2,
               "total": 6, "steps": steps, "torch": torch.__version__}, f)
print("wrote tests/fixtures/optim/adamw.json")
