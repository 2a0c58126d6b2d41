#!/usr/bin/env python3
"""Generate DPO gradient-parity fixtures (transformers + peft) for `rlaifd grad`.

Run through tools/gen_grad_fixtures.sh.  Inputs are the tiny models of tests/fixtures/llava/ (made by
tools/gen_fixtures.py); the text-only llama case gets a LoRA adapter created here.  Output per case, under
tests/fixtures/grad/<case>/:

  pairs.jsonl        3 lines {"image": path relative to this file or null, "prompt_ids": [...] (image token
                     once, NOT expanded), "chosen_ids": [...], "rejected_ids": [...]}
  expected.json      {"case", "beta", "loss", "per_pair": [{"policy_chosen", "policy_rejected", "ref_chosen",
                     "ref_rejected", ...}], "adapter_dir", "model_dir" (relative to this file's directory),
                     "versions", plus checks}
  grads.safetensors  f32 d loss / d tensor for EVERY tensor of the adapter file, under the adapter file's own
                     key names and shapes (unused vision LoRA modules: exact zeros)
  adapter/           (llama_text_only only) the LoRA adapter created here

Definition (what `rlaifd grad` must reproduce):
  for a pair, the model input is prompt_ids + answer_ids with the image token expanded to num_image_patches
  copies; logp(answer) = sum over the answer tokens of log softmax(logits[t-1])[token_t];
  policy = base + adapter (weights exactly as stored, bf16/f16 upcast to f32), ref = base with the adapter
  disabled (peft `disable_adapter()`, no grad);
  loss = mean over pairs of -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).
All in float32 on CPU, model.eval(), attn_implementation="eager", one sequence per forward (no padding).

Checks done here: base weights after loading == the fixture checkpoint tensors; adapter params == the
adapter file tensors (by key name); base/adapter logprobs of the llava fixture's expected.json reproduced;
loss and gradients bitwise identical when recomputed; float64 central finite differences on 2 random
elements of one lora_B tensor agree with the float32 autograd gradient; float32 gradients vs a float64
autograd recomputation.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import peft
import tokenizers
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import (IMAGE_ID, UNK, answer_logps, checkpoint_tensors, compute_logprobs,  # noqa: E402
                            derived_fixture_dirs, dir_size, f64_exact, fixture_pixel_values, load_model,
                            peft_saved, randomize_lora_, rename_adapter_key, rename_base_key, unused_vision_keys,
                            write_json)

VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__}

DEFINITION = ("loss = mean_pairs -logsigmoid(beta*((pi_c-ref_c)-(pi_r-ref_r))); pi/ref = sum over answer tokens of "
              "log_softmax(logits[t-1])[tok_t] for input prompt_ids+answer_ids (image token expanded to "
              "num_image_patches copies); pi = base+adapter (stored weights upcast to f32), ref = adapter disabled; "
              "f32, eval, eager attention, one sequence per forward")

# Pairs as text (tokenized with the fixture's word-level tokenizer; the prompt gets <s> from the post-processor,
# answers are encoded without special tokens; "</s>" in an answer is the EOS id 2).
CASES: list[dict[str, Any]] = [
    dict(
        name="l15_4x_f32_gqa_tied_lora", beta=0.1, fd_key="language_model.model.layers.1.self_attn.v_proj.lora_B",
        note="layout 4.x f32 tied, OLD adapter naming, LoRA r8/a16 on all 7 llama projections + CLIP q/k/v of "
             "3 vision layers; feature layer -2 so vision layer 2 is unused (its LoRA grads are exactly 0)",
        pairs=[
            ("USER: <image>\ndescribe the image . ASSISTANT:", "there is a red circle .", "a blue square"),
            ("USER: <image>\nis there a cat ? ASSISTANT:", "yes , a small cat </s>", "no , it is a dog"),
            ("USER: what color is the box on the left ? <image>\nASSISTANT:", "the box is green .",
             "the box is yellow ."),
        ],
    ),
    dict(
        name="l3rope_5x_bf16_mha_rslora", beta=0.5, fd_key="model.vision_tower.encoder.layers.0.self_attn.v_proj.lora_B",
        note="layout 5.x bf16 model, llama3 rope, rsLoRA r6/a16 on q/v/down + CLIP q/v (both vision layers used: "
             "feature layer -1), adapter stored in bf16 (upcast to f32, compute f32), beta 0.5",
        pairs=[
            ("<image>\nUSER: what do you see ? ASSISTANT:", "a tree near the sky", "a dog here"),
            ("<image>\nUSER: is the dot dark ? ASSISTANT:", "it is dark .",
             "it is a bright yellow dot here ."),
            ("USER: <image>\nshow me the shape . ASSISTANT:", "one large triangle", "two small circle and line"),
        ],
    ),
    dict(
        name="l15_452_f16_mqa_sharded_lora", beta=0.1, fd_key="model.language_model.layers.0.self_attn.q_proj.lora_B",
        note="layout 4.52 f16 sharded MQA, LoRA r4/a16 regex target (language q/v only, no vision LoRA), "
             "feature layer -3, strategy full",
        pairs=[
            ("USER: what is in this picture ? <image>\nshow me the shape . ASSISTANT:", "a small square .",
             "many dot and line ."),
            ("USER: <image>\ndo you see a cat ? ASSISTANT:", "no , no cat .", "yes , one cat with a dog"),
            ("USER: <image>\nwhat color is the sky ? ASSISTANT:", "blue , bright blue </s>", "dark green ."),
        ],
    ),
    dict(
        name="llama_text_only", beta=0.1, fd_key="model.layers.1.mlp.down_proj.lora_B",
        note="text-only LlamaForCausalLM f32 (llama3 rope, legacy config); LoRA r4/a12 on all 7 projections "
             "created here (random non-zero A and B, new naming), stored in f32",
        create_adapter=dict(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], seed=9100),
        pairs=[
            ("USER: describe a red circle and a blue square . ASSISTANT:", "there is a red circle .",
             "a blue square"),
            ("USER: what color is the sky ? ASSISTANT:", "the sky is blue </s>", "it is a green tree"),
            ("USER: do you see two dog ? ASSISTANT:", "yes , two dog", "no , one cat"),
        ],
    ),
]


# ---------------------------------------------------------------------------------------------
# helpers (the shared ones are in tools/fixture_common.py)
# ---------------------------------------------------------------------------------------------
def st_dtypes(path: str) -> set[str]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        hdr = json.loads(f.read(n))
    return {v["dtype"] for k, v in hdr.items() if k != "__metadata__"}


# ---------------------------------------------------------------------------------------------
# model / adapter loading
# ---------------------------------------------------------------------------------------------
def create_llama_adapter(model_dir: str, adir: str, spec: dict) -> None:
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    pm = get_peft_model(base, LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"],
                                         target_modules=spec["target_modules"], lora_dropout=0.0))
    randomize_lora_(pm, torch.Generator().manual_seed(spec["seed"]), spec["r"], spec["lora_alpha"] / spec["r"])
    acfg, asd = peft_saved(pm)
    assert asd and all(k.startswith("base_model.model.model.layers.") for k in asd), list(asd)[:3]
    assert all(bool((v != 0).any()) for v in asd.values())
    os.makedirs(adir)
    save_file({k: asd[k].contiguous() for k in sorted(asd)}, os.path.join(adir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg["base_model_name_or_path"] = "../../../llava/llama_text_only/model"
    write_json(os.path.join(adir, "adapter_config.json"), acfg)


def load_case(mdir: str, adir: str, text_only: bool, layout: str, adapter_key_layout: str):
    model = load_model(mdir, text_only)
    model.config.use_cache = False

    # the loaded weights are exactly the fixture's (16-bit checkpoints upcast to f32)
    ck = checkpoint_tensors(mdir)
    seen = set()
    for k, v in model.state_dict().items():
        ck_key = rename_base_key(k, layout)
        if ck_key not in ck:
            assert k == "lm_head.weight" and "embed_tokens" in str(ck.keys()), k  # tied head
            continue
        assert v.dtype == torch.float32 and torch.equal(v, ck[ck_key].float()), k
        seen.add(ck_key)
    assert seen == set(ck), set(ck) ^ seen

    pm = PeftModel.from_pretrained(model, adir, is_trainable=True)
    pm.eval()
    stored = load_file(os.path.join(adir, "adapter_model.safetensors"))
    params = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert ".lora_A.default." in n or ".lora_B.default." in n, n
            params[rename_adapter_key(n.replace(".default.", "."), adapter_key_layout)] = p
        else:
            assert "lora_" not in n, n
    assert set(params) == set(stored), set(params) ^ set(stored)
    for k, p in params.items():
        assert p.dtype == torch.float32 and p.shape == stored[k].shape, k
        assert torch.equal(p.detach(), stored[k].float()), f"adapter param {k} != stored tensor"
    return pm, params, stored


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------
def dpo_loss(pm, pairs, pv, n_img, beta, dtype=torch.float32):
    terms, rows = [], []
    for p in pairs:
        pc = answer_logps(pm, p["prompt_ids"], p["chosen_ids"], pv, n_img, dtype)
        pr = answer_logps(pm, p["prompt_ids"], p["rejected_ids"], pv, n_img, dtype)
        with torch.no_grad(), pm.disable_adapter():
            rc = answer_logps(pm, p["prompt_ids"], p["chosen_ids"], pv, n_img, dtype)
            rr = answer_logps(pm, p["prompt_ids"], p["rejected_ids"], pv, n_img, dtype)
        z = beta * ((pc.sum() - rc.sum()) - (pr.sum() - rr.sum()))
        term = -F.logsigmoid(z)
        terms.append(term)
        rows.append(dict(policy_chosen=float(pc.sum()), policy_rejected=float(pr.sum()),
                         ref_chosen=float(rc.sum()), ref_rejected=float(rr.sum()), z=float(z), loss=float(term),
                         policy_chosen_tokens=[float(v) for v in pc], policy_rejected_tokens=[float(v) for v in pr],
                         ref_chosen_tokens=[float(v) for v in rc], ref_rejected_tokens=[float(v) for v in rr]))
    return torch.stack(terms).mean(), rows


def grads_of(pm, params, pairs, pv, n_img, beta, dtype=torch.float32):
    pm.zero_grad(set_to_none=True)
    loss, rows = dpo_loss(pm, pairs, pv, n_img, beta, dtype)
    loss.backward()
    g = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    pm.zero_grad(set_to_none=True)
    return loss.detach(), rows, g


# ---------------------------------------------------------------------------------------------
def run_case(case, llava_root, out_root):
    name = case["name"]
    src = os.path.join(llava_root, name)
    mdir = os.path.join(src, "model")
    cdir = os.path.join(out_root, name)
    os.makedirs(cdir)
    fix = json.load(open(os.path.join(src, "expected.json")))
    text_only = fix["image_token_id"] is None
    n_img = fix["num_image_patches"]
    layout = fix["layout"]

    if case.get("create_adapter"):
        assert not fix["adapter"]
        adir = os.path.join(cdir, "adapter")
        create_llama_adapter(mdir, adir, case["create_adapter"])
        akl, adapter_dtype = "llama", "f32"
    else:
        adir = os.path.join(src, "adapter")
        akl = "5.x" if fix["adapter"]["key_layout"] == "hybrid" else fix["adapter"]["key_layout"]
        adapter_dtype = fix["adapter"]["dtype"]
    file_dtypes = st_dtypes(os.path.join(adir, "adapter_model.safetensors"))
    assert file_dtypes == {{"f32": "F32", "bf16": "BF16", "f16": "F16"}[adapter_dtype]}, file_dtypes

    torch.manual_seed(0)
    pm, params, stored = load_case(mdir, adir, text_only, layout, akl)
    acfg = json.load(open(os.path.join(adir, "adapter_config.json")))
    scaling = acfg["lora_alpha"] / (math.sqrt(acfg["r"]) if acfg.get("use_rslora") else acfg["r"])

    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    pv, image_rel = None, None
    if not text_only:
        pv = fixture_pixel_values(mdir, src)
        image_rel = os.path.relpath(os.path.join(src, "image.png"), cdir)

    # the fixture's own reference logprobs are reproduced (loading + expansion are right)
    with pm.disable_adapter():
        base_lp, _ = compute_logprobs(pm, fix["input_ids"], pv, n_img, use_cache=False)
    d_base = max(abs(a - b) for a, b in zip(base_lp, fix["logprobs"]))
    assert d_base < 1e-5, d_base
    d_ad = None
    if fix.get("logprobs_adapter"):
        ad_lp, _ = compute_logprobs(pm, fix["input_ids"], pv, n_img, use_cache=False)
        d_ad = max(abs(a - b) for a, b in zip(ad_lp, fix["logprobs_adapter"]))
        assert d_ad < 1e-5, d_ad

    # pairs
    pairs = []
    for prompt, chosen, rejected in case["pairs"]:
        p_ids = tok.encode(prompt).ids
        c_ids = tok.encode(chosen, add_special_tokens=False).ids
        r_ids = tok.encode(rejected, add_special_tokens=False).ids
        assert p_ids.count(IMAGE_ID) == (0 if text_only else 1), prompt
        for s in (p_ids, c_ids, r_ids):
            assert UNK not in s, (prompt, chosen, rejected, s)
        assert 3 <= len(c_ids) <= 8 and 3 <= len(r_ids) <= 8, (chosen, rejected)
        assert c_ids != r_ids and IMAGE_ID not in c_ids + r_ids
        pairs.append(dict(image=image_rel, prompt_ids=p_ids, chosen_ids=c_ids, rejected_ids=r_ids,
                          _text=(prompt, chosen, rejected)))
    assert any(len(p["chosen_ids"]) != len(p["rejected_ids"]) for p in pairs)
    with open(os.path.join(cdir, "pairs.jsonl"), "w") as f:
        for p in pairs:
            f.write(json.dumps({k: p[k] for k in ("image", "prompt_ids", "chosen_ids", "rejected_ids")}) + "\n")

    beta = case["beta"]
    loss, rows, grads = grads_of(pm, params, pairs, pv, n_img, beta)
    loss2, rows2, grads2 = grads_of(pm, params, pairs, pv, n_img, beta)
    deterministic = bool(torch.equal(loss, loss2) and rows == rows2 and
                         all(torch.equal(grads[k], grads2[k]) for k in grads))
    assert deterministic

    zero_keys = sorted(k for k, g in grads.items() if not bool((g != 0).any()))
    # expected exact zeros: LoRA modules in vision layers past the feature layer
    exp_zero = [] if text_only else unused_vision_keys(grads, fix["knobs"])
    assert zero_keys == sorted(exp_zero), (zero_keys, exp_zero)
    assert all(torch.isfinite(g).all() for g in grads.values())

    # float64 check: autograd f64 gradients + central finite differences on 2 elements of one lora_B
    pm64 = copy.deepcopy(pm).double()
    pm64.base_model.model.set_attn_implementation("sdpa")
    names64 = dict(pm64.named_parameters())
    params64 = {k: names64[n] for k, n in zip(params, [n for n, q in pm.named_parameters() if q.requires_grad])}
    assert all(params64[k].shape == params[k].shape and params64[k].dtype == torch.float64 for k in params)
    pv64 = None if pv is None else pv.double()
    fd_key = next(k for k in params if k.endswith(case["fd_key"] + ".weight"))
    with f64_exact():
        loss64, _, grads64 = grads_of(pm64, params64, pairs, pv64, n_img, beta, torch.float64)
        gen = torch.Generator().manual_seed(1234)
        P = params64[fd_key]
        fd_rows = []
        eps = 1e-5
        for _ in range(2):
            flat = int(torch.randint(P.numel(), (1,), generator=gen))
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), P.shape))
            with torch.no_grad():
                orig = P[idx].item()
                P[idx] = orig + eps
                lp, _ = dpo_loss(pm64, pairs, pv64, n_img, beta, torch.float64)
                P[idx] = orig - eps
                lm, _ = dpo_loss(pm64, pairs, pv64, n_img, beta, torch.float64)
                P[idx] = orig
            fd = (float(lp) - float(lm)) / (2 * eps)
            g32 = float(grads[fd_key][idx])
            fd_rows.append(dict(key=fd_key, index=list(idx), eps=eps, finite_difference_f64=fd,
                                autograd_f32=g32, autograd_f64=float(grads64[fd_key][idx]),
                                rel_err_f32_vs_fd=abs(g32 - fd) / max(abs(fd), 1e-30)))
    gmax = max(float(g.abs().max()) for g in grads64.values())
    g_abs = max(float((grads[k].double() - grads64[k]).abs().max()) for k in grads)
    g_rel = max(float((grads[k].double() - grads64[k]).norm() / max(float(grads64[k].norm()), 1e-30))
                for k in grads if k not in zero_keys)
    for r in fd_rows:
        assert r["rel_err_f32_vs_fd"] < 1e-3, r
    assert abs(float(loss64) - float(loss)) < 1e-5, (float(loss64), float(loss))
    assert all(not bool((grads64[k] != 0).any()) for k in zero_keys)

    save_file({k: grads[k].float().contiguous() for k in sorted(grads)}, os.path.join(cdir, "grads.safetensors"),
              metadata={"format": "pt"})
    for k in stored:
        assert grads[k].shape == stored[k].shape

    mods = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k) for k in stored})
    exp = {
        "case": name,
        "note": case["note"],
        "beta": beta,
        "loss": float(loss),
        "per_pair": [{k: v for k, v in r.items()} | {"chosen_text": p["_text"][1], "rejected_text": p["_text"][2],
                                                      "prompt_text": p["_text"][0]}
                     for r, p in zip(rows, pairs)],
        "adapter_dir": os.path.relpath(adir, cdir),
        "model_dir": os.path.relpath(mdir, cdir),
        "paths_relative_to": "the directory of this file",
        "definition": DEFINITION,
        "image_token_id": None if text_only else IMAGE_ID,
        "num_image_patches": n_img,
        "model_layout": layout,
        "model_dtype": fix["dtype"],
        "compute_dtype": "f32",
        "adapter_dtype": adapter_dtype,
        "adapter_upcast_to_f32": adapter_dtype != "f32",
        "adapter_key_layout": akl,
        "adapter_r": acfg["r"], "adapter_lora_alpha": acfg["lora_alpha"],
        "adapter_use_rslora": bool(acfg.get("use_rslora")), "adapter_scaling": scaling,
        "lora_modules": mods,
        "grad_tensors": len(grads),
        "zero_grad_keys": zero_keys,
        "grad_max_abs": max(float(g.abs().max()) for g in grads.values()),
        "checks": {
            "deterministic_recompute": deterministic,
            "fixture_logprobs_maxdiff": {"base": d_base, "adapter": d_ad},
            "f64_loss": float(loss64),
            "f32_vs_f64_grad_max_abs_diff": g_abs,
            "f32_vs_f64_grad_max_rel_norm_diff": g_rel,
            "f64_grad_max_abs": gmax,
            "finite_difference": fd_rows,
            "f64_note": "float64 copy of the model with sdpa attention and RMSNorm kept in float64 (the f32 "
                        "reference itself uses eager attention / stock RMSNorm)",
        },
        "versions": VERSIONS,
    }
    write_json(os.path.join(cdir, "expected.json"), exp)
    return exp


def main():
    llava_root, out_root = derived_fixture_dirs("grad")
    print(f"versions: {VERSIONS}")
    for case in CASES:
        e = run_case(case, llava_root, out_root)
        fdr = e["checks"]["finite_difference"]
        print(f"\n{e['case']}: beta {e['beta']} loss {e['loss']:.6f} (f64 {e['checks']['f64_loss']:.6f}) "
              f"size {dir_size(os.path.join(out_root, e['case'])) / 1024:.1f} KiB")
        for i, r in enumerate(e["per_pair"]):
            print(f"  pair {i}: pi_c {r['policy_chosen']:.4f} pi_r {r['policy_rejected']:.4f} ref_c "
                  f"{r['ref_chosen']:.4f} ref_r {r['ref_rejected']:.4f} z {r['z']:.4f} loss {r['loss']:.4f}")
        print(f"  modules with LoRA: {len(e['lora_modules'])}; grad tensors {e['grad_tensors']}; "
              f"zero-grad tensors {len(e['zero_grad_keys'])}: {e['zero_grad_keys']}")
        print(f"  f32 vs f64 grads: max abs {e['checks']['f32_vs_f64_grad_max_abs_diff']:.2e}, "
              f"max rel (per tensor norm) {e['checks']['f32_vs_f64_grad_max_rel_norm_diff']:.2e}; "
              f"max |grad| {e['grad_max_abs']:.3e}")
        for r in fdr:
            print(f"  FD {r['key']}{r['index']}: fd64 {r['finite_difference_f64']:.8e} autograd32 "
                  f"{r['autograd_f32']:.8e} autograd64 {r['autograd_f64']:.8e} rel err {r['rel_err_f32_vs_fd']:.2e}")
    print(f"\ntotal size of {out_root}: {dir_size(out_root) / 1024:.1f} KiB")


if __name__ == "__main__":
    sys.exit(main())
