"""Shared setup of the PyTorch peers of benches/dpo_cpu.sh and benches/sft_cpu.sh: a LLaVA checkpoint with a
fresh LoRA adapter (r, alpha on every linear layer of the language model; vision tower frozen), its image
processor, token-form data with the image token expanded, and frozen image features."""
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration


def load_lora_llava(model_dir, r, alpha, attn):
    """(peft model in train mode, config, image processor, image rows per image, image token id)."""
    base = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    cfg = base.config
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(base, lora)
    model.train()  # no dropout anywhere in this config; train() only mirrors a trainer
    vision_trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "vision_tower" in n)
    assert vision_trainable == 0, "the vision tower must be frozen"
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    if cfg.vision_feature_select_strategy == "full":
        n_img += 1
    return model, cfg, CLIPImageProcessor.from_pretrained(model_dir), n_img, cfg.image_token_index


def read_items(path, proc, n_img, img_tok):
    """Token-form JSONL lines with their pixels, the prompt's image token expanded to n_img rows (`prompt`), and
    each `X_ids` answer also as `X`."""
    items = []
    root = os.path.dirname(os.path.abspath(path))
    for line in open(path):
        if not line.strip():
            continue
        item = json.loads(line)
        prompt = []
        for t in item["prompt_ids"]:
            prompt += [t] * n_img if t == img_tok else [t]
        item["prompt"] = prompt
        for key in [k for k in item if k.endswith("_ids") and k != "prompt_ids"]:
            item[key[:-4]] = item[key]  # chosen_ids -> chosen, answer_ids -> answer
        item["pixels"] = proc(images=Image.open(os.path.join(root, item["image"])).convert("RGB"), return_tensors="pt")["pixel_values"]
        items.append(item)
    return items


def image_features(model, cfg, pixels):
    """Projected image features of the frozen vision tower and projector (no graph kept)."""
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                        return_dict=True)
