"""Helpers shared by the parity-fixture generators.

Used by tools/gen_fixtures.py (the tiny models under tests/fixtures/llava/), tools/gen_grad_fixtures.py
(tests/fixtures/grad/) and tools/gen_sft_fixtures.py (tests/fixtures/sft/).  The generators run as
`python tools/gen_X.py` (through tools/run_fixture_gen.sh) and put this file's directory on sys.path themselves.
Importing this module silences transformers' logging and progress bars.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile

import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration
from transformers.models.llama import modeling_llama

try:  # transformers >= 5: the slow PIL processor is CLIPImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as SlowCLIPImageProcessor
except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow one
    from transformers import CLIPImageProcessor as SlowCLIPImageProcessor

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))

# Token ids of the shared word-level tokenizer built by tools/gen_fixtures.py:
# <unk>=0 <s>=1 </s>=2, 61 words (3..63), <image>=64, <pad>=65  (66 tokens).
UNK, BOS, EOS = 0, 1, 2
IMAGE_ID = 64
PAD_ID = 65
TOKENIZER_SIZE = 66


# ---------------------------------------------------------------------------------------------
# files / process setup
# ---------------------------------------------------------------------------------------------
def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def build_cases(cases: list, out: str, base_seed: int, build, only: list | None) -> list:
    """Builds every case (seed base_seed + its index, so adding cases at the end keeps the others' seeds), or with
    `only` just those named, merged into the existing manifest (the others are left as committed)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "manifest.json")
    old = {}
    if only and os.path.exists(path):
        with open(path) as f:
            old = {m["name"]: m for m in json.load(f)}
    manifest = []
    for i, c in enumerate(cases):
        if not only or c["name"] in only:
            manifest.append(build(c, out, base_seed + i))
        elif c["name"] in old:
            manifest.append(old[c["name"]])
    write_json(path, manifest)
    return manifest


def dir_size(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def deterministic_torch() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def derived_fixture_dirs(out_name: str) -> tuple[str, str]:
    """Command line of the generators that derive fixtures from tests/fixtures/llava/: --llava DIR --out DIR
    (default out: tests/fixtures/<out_name>).  Pins torch to deterministic single-threaded CPU, empties the output
    directory and returns (llava_root, out_root) as absolute paths."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--llava", default=os.path.join(TOOLS_DIR, "..", "tests", "fixtures", "llava"))
    ap.add_argument("--out", default=os.path.join(TOOLS_DIR, "..", "tests", "fixtures", out_name))
    args = ap.parse_args()
    deterministic_torch()
    llava_root, out_root = os.path.abspath(args.llava), os.path.abspath(args.out)
    if os.path.isdir(out_root):
        shutil.rmtree(out_root)
    os.makedirs(out_root)
    return llava_root, out_root


# ---------------------------------------------------------------------------------------------
# checkpoint key layouts
# ---------------------------------------------------------------------------------------------
def rename_base_key(k: str, layout: str) -> str:
    """In-memory transformers 5.x name (model.language_model.*, lm_head.weight, model.vision_tower.*,
    model.multi_modal_projector.*) -> checkpoint name of a layout (see tools/gen_fixtures.py)."""
    if layout in ("5.x", "llama"):
        return k
    if layout == "4.52":
        return re.sub(r"^model\.vision_tower\.", "model.vision_tower.vision_model.", k)
    if layout in ("4.x", "hybrid"):
        vis = "vision_tower.vision_model." if layout == "4.x" else "vision_tower."
        k = re.sub(r"^model\.language_model\.", "language_model.model.", k)
        k = re.sub(r"^lm_head\.", "language_model.lm_head.", k)
        k = re.sub(r"^model\.vision_tower\.", vis, k)
        return re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", k)
    raise ValueError(layout)


def rename_adapter_key(k: str, layout: str) -> str:
    """k as peft writes it for the in-memory model: base_model.model.<module>.lora_X.weight"""
    p = "base_model.model."
    assert k.startswith(p), k
    return p + rename_base_key(k[len(p):], layout)


def checkpoint_files(model_dir: str) -> list[str]:
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    return sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]


def checkpoint_keys(model_dir: str) -> list[str]:
    keys = []
    for fn in checkpoint_files(model_dir):
        with safe_open(os.path.join(model_dir, fn), "pt") as f:
            keys += list(f.keys())
    return sorted(keys)


def checkpoint_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    out = {}
    for fn in checkpoint_files(model_dir):
        out.update(load_file(os.path.join(model_dir, fn)))
    return out


# ---------------------------------------------------------------------------------------------
# models, adapters, images
# ---------------------------------------------------------------------------------------------
def load_model(model_dir: str, text_only: bool):
    """A fixture model from disk in float32 with eager attention, in eval mode; no missing/unexpected/mismatched
    keys allowed."""
    cls = LlamaForCausalLM if text_only else LlavaForConditionalGeneration
    model, info = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, problems
    return model.eval()


def randomize_lora_(pm, gen: torch.Generator, r: int, scaling: float) -> None:
    """Random non-zero LoRA weights (peft initializes B to zero): A ~ N(0, 1/fan_in), B such that the update
    B @ A * scaling has entries of order 0.5/sqrt(r) per unit input; parameters visited in sorted name order."""
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / (scaling * math.sqrt(r)))


def peft_saved(pm) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) exactly as peft's save_pretrained writes them."""
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        acfg = json.load(open(os.path.join(tmp, "adapter_config.json")))
        asd = load_file(os.path.join(tmp, "adapter_model.safetensors"))
    return acfg, asd


def fixture_pixel_values(model_dir: str, case_dir: str) -> torch.Tensor:
    """pixel_values of <case_dir>/image.png through the slow CLIP processor of <model_dir>, checked against the
    ones stored in <case_dir>/expected.safetensors."""
    proc = SlowCLIPImageProcessor.from_pretrained(model_dir)
    pv = proc(images=Image.open(os.path.join(case_dir, "image.png")), return_tensors="pt")["pixel_values"].float()
    ref = load_file(os.path.join(case_dir, "expected.safetensors"))
    assert torch.equal(pv[0], ref["pixel_values"]), "pixel_values mismatch after reload"
    return pv


def unused_vision_keys(keys, knobs: dict, post_layernorm: bool = False) -> list[str]:
    """Keys of vision-tower tensors that cannot influence the output: encoder layers past the selected feature
    layer and, with post_layernorm, the vision post_layernorm (LLaVA never applies it).  knobs: the "knobs" entry
    of a tests/fixtures/llava/<case>/expected.json."""
    nl = knobs["vision"]["num_hidden_layers"]
    fl = knobs["vision_feature_layer"]
    last_used = (nl + 1 + fl if fl < 0 else fl) - 1  # hidden_states[i] is the output of layer i-1
    out = []
    for k in keys:
        m = re.search(r"vision_tower\..*encoder\.layers\.(\d+)\.", k)
        if (m and int(m.group(1)) > last_used) or (post_layernorm and
                                                   re.search(r"vision_tower\..*post_layernorm\.", k)):
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------
# forward passes / log-probabilities
# ---------------------------------------------------------------------------------------------
def expand_ids(ids: list[int], n: int) -> tuple[list[int], list[int]]:
    """ids with the image token expanded to n copies, and the position of each original token in the result."""
    out, pos = [], []
    for t in ids:
        pos.append(len(out))
        out.extend([t] * n if t == IMAGE_ID else [t])
    return out, pos


def expand(ids: list[int], n_img: int) -> list[int]:
    return expand_ids(ids, n_img)[0]


def model_inputs(ids: list[int], pv, **extra) -> dict:
    x = torch.tensor([ids])
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), **extra)
    if pv is not None:
        kw["pixel_values"] = pv
    return kw


@torch.no_grad()
def forward_logits(model, ids: list[int], pv, **extra):
    return model(**model_inputs(ids, pv, **extra)).logits[0].float()


@torch.no_grad()
def compute_logprobs(model, ids, pv, n_img, **extra):
    """log p of every token of ids after the first (image tokens skipped), one forward over the expanded ids."""
    exp, pos = expand_ids(ids, n_img)
    logits = forward_logits(model, exp, pv, **extra)
    lsm = torch.log_softmax(logits, dim=-1)
    lps = [float(lsm[pos[j] - 1, ids[j]]) for j in range(1, len(ids)) if ids[j] != IMAGE_ID]
    return lps, logits


def answer_logps(model, prompt_ids, ans_ids, pv, n_img, dtype=torch.float32):
    """Per-token log p of ans_ids after prompt_ids (with autograd), computed in dtype."""
    full = expand(prompt_ids + ans_ids, n_img)
    P = len(expand(prompt_ids, n_img))
    logits = model(**model_inputs(full, pv, use_cache=False)).logits[0].to(dtype)
    lsm = torch.log_softmax(logits[P - 1:P - 1 + len(ans_ids)], dim=-1)
    return lsm.gather(1, torch.tensor(ans_ids)[:, None])[:, 0]


@contextlib.contextmanager
def f64_exact():
    """For the float64 verification model: LlamaRMSNorm computes in float32 internally (and eager llama attention
    takes its softmax in float32; the f64 model is switched to sdpa separately); both would cap a float64 finite
    difference at float32 precision.  Inside this context RMSNorm keeps the input dtype."""
    orig = modeling_llama.LlamaRMSNorm.forward

    def fwd(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

    modeling_llama.LlamaRMSNorm.forward = fwd
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = orig


def make_image(w: int, h: int, seed: int) -> Image.Image:
    """A blocky random RGB image with pixel noise (the family fixtures' test images)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.NEAREST)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_dpo_grad_fixture(pm, pairs, logps, case_dir, grad_dir, case_name, n_img, definition, beta=0.1):
    """A DPO gradient fixture in the format of tests/fixtures/grad/ (engine/tests/grad_parity.rs) for a peft model
    `pm` whose LoRA weights are already randomized: its adapter under <case_dir>/adapter, the loss
    mean_pairs -logsigmoid(beta*((pi_c-ref_c)-(pi_r-ref_r))) over `pairs` (dicts of prompt_ids, chosen_ids,
    rejected_ids on the case's image.png) with `logps(model, prompt_ids, answer_ids)` giving per-token log-probs,
    and the LoRA gradients by autograd in grads.safetensors, pairs.jsonl and expected.json."""
    import peft
    import torch.nn.functional as F
    from safetensors.torch import save_file

    acfg, asd = peft_saved(pm)
    adir = os.path.join(case_dir, "adapter")
    os.makedirs(adir, exist_ok=True)
    write_json(os.path.join(adir, "adapter_config.json"), acfg)
    save_file(asd, os.path.join(adir, "adapter_model.safetensors"), metadata={"format": "pt"})
    pm.zero_grad()
    terms = []
    for p in pairs:
        pc = logps(pm, p["prompt_ids"], p["chosen_ids"])
        pr = logps(pm, p["prompt_ids"], p["rejected_ids"])
        with torch.no_grad(), pm.disable_adapter():
            rc = logps(pm, p["prompt_ids"], p["chosen_ids"])
            rr = logps(pm, p["prompt_ids"], p["rejected_ids"])
        terms.append(-F.logsigmoid(beta * ((pc.sum() - rc.sum()) - (pr.sum() - rr.sum()))))
    loss = torch.stack(terms).mean()
    loss.backward()
    grads = {}
    for n, prm in pm.named_parameters():
        if prm.requires_grad:
            key = n.replace(".default.", ".")
            assert key in asd, key
            grads[key] = (prm.grad if prm.grad is not None else torch.zeros_like(prm)).detach().clone().contiguous()
    shutil.rmtree(grad_dir, ignore_errors=True)
    os.makedirs(grad_dir)
    save_file(grads, os.path.join(grad_dir, "grads.safetensors"), metadata={"format": "pt"})
    rel = os.path.relpath(case_dir, grad_dir)
    with open(os.path.join(grad_dir, "pairs.jsonl"), "w") as f:
        for p in pairs:
            f.write(json.dumps(dict(image=os.path.join(rel, "image.png"), **p)) + "\n")
    write_json(os.path.join(grad_dir, "expected.json"), dict(
        case=case_name, model_dir=os.path.join(rel, "model"), adapter_dir=os.path.join(rel, "adapter"),
        beta=beta, loss=float(loss), grad_tensors=len(grads), n_image_features=n_img, definition=definition,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)))
