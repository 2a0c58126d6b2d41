"""Loads a base model + a PEFT adapter directory written by rlaifd with PeftModel.from_pretrained and prints
the log-probs of the given ids (JSON), for the adapter round-trip check in daemon/tests/peft_roundtrip.rs.

usage: peft_logprobs.py MODEL_DIR ADAPTER_DIR IDS_JSON [IMAGE]
Image token handling follows the rlaifd logprobs contract (image token once in the ids; expanded here).
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoConfig, LlamaForCausalLM, LlavaForConditionalGeneration

model_dir, adapter_dir, ids_json = sys.argv[1:4]
image = sys.argv[4] if len(sys.argv) > 4 else None
ids = json.loads(ids_json)
cfg = AutoConfig.from_pretrained(model_dir)
with torch.no_grad():
    if cfg.model_type == "llava":
        from transformers import CLIPImageProcessorPil
        from PIL import Image

        base = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        proc = CLIPImageProcessorPil.from_pretrained(model_dir)
        px = proc(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
        tok = cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index
        vc = cfg.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        p = ids.index(tok)
        expanded = ids[:p] + [tok] * n + ids[p + 1:]
        logits = model(input_ids=torch.tensor([expanded]), pixel_values=px).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        out = []
        for j in range(1, len(ids)):
            if ids[j] == tok:
                continue
            e = j + (n - 1 if j > p else 0)
            out.append(lp[e - 1, ids[j]].item())
    else:
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        out = [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]
print(json.dumps({"logprobs": out}))
