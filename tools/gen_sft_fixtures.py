#!/usr/bin/env python3
"""Generate full-parameter SFT gradient-parity fixtures (transformers) for the Rust SFT loss/backward.

Run through tools/gen_sft_fixtures.sh.  Inputs are the tiny models of tests/fixtures/llava/ (made by
tools/gen_fixtures.py); model loading follows tools/gen_grad_fixtures.py.  Output per case, under
tests/fixtures/sft/<case>/:

  data.jsonl         3 lines {"image": path relative to this file or null, "prompt_ids": [...] (image token
                     once, NOT expanded), "answer_ids": [...]}
  expected.json      {"case", "model_dir" (relative to this file's directory), "loss", "n_tokens", "versions",
                     plus per-example values, the definition and the checks done}
  grads.safetensors  f32 d loss / d parameter for EVERY parameter of the model (vision tower, projector,
                     embeddings, norms, lm_head), under the CHECKPOINT's own key names and shapes (the layout of
                     that case's model.safetensors).  Tied embeddings: there is no lm_head key; the tied gradient
                     (embedding use + LM-head use, summed) is stored under the embedding key.  Vision layers past
                     the selected feature layer and vision post_layernorm do not influence the loss: exact zeros.

Definition (what the Rust side must reproduce):
  for an example, the model input is prompt_ids + answer_ids with the image token expanded to num_image_patches
  copies; nll(example) = sum over its answer tokens of -log_softmax(logits[t-1])[token_t] (prompt tokens masked);
  loss = (sum over the 3 examples of nll) / (total number of answer tokens of the 3 examples)
  i.e. a token-level mean over the batch.  Weights exactly as stored (bf16 upcast to f32), compute f32 on CPU,
  model.eval() (no dropout), attn_implementation="eager", one sequence per forward (no padding).

Checks done here: loaded weights == the checkpoint tensors (every checkpoint key maps to exactly one parameter);
the llava fixture's expected.json logprobs reproduced; loss and gradients bitwise identical when recomputed; the
set of all-zero gradient tensors is exactly the expected one; float32 gradients vs a float64 autograd
recomputation; float64 central finite differences on 2 random elements each of an embedding row used by a
prompt, a norm weight, and (vision cases) the patch embedding (+ a last-layer vision norm) agree with the
float32 autograd gradient.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from typing import Any

import torch
from safetensors.torch import save_file

import tokenizers
import transformers
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import (EOS, IMAGE_ID, UNK, answer_logps, checkpoint_tensors, compute_logprobs,  # noqa: E402
                            derived_fixture_dirs, dir_size, f64_exact, fixture_pixel_values, load_model,
                            rename_base_key, unused_vision_keys, write_json)

VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}

DEFINITION = ("loss = (sum over examples of sum over answer tokens of -log_softmax(logits[t-1])[tok_t]) / "
              "(total answer tokens of all examples); input prompt_ids+answer_ids with the image token expanded to "
              "num_image_patches copies, prompt tokens masked; all parameters trainable; stored weights upcast to "
              "f32, f32 compute, eval, eager attention, one sequence per forward (no padding)")

# Examples as text (tokenized with the fixture's word-level tokenizer; the prompt gets <s> from the post-processor,
# answers are encoded without special tokens; "</s>" in an answer is the EOS id 2).
CASES: list[dict[str, Any]] = [
    dict(
        name="l15_4x_f32_gqa_tied_lora",
        note="layout 4.x f32, tied embeddings (no lm_head key: tied grad = embedding grad + lm_head grad, stored "
             "under language_model.model.embed_tokens.weight), CLIP 3 layers, feature layer -2 so vision layer 2 "
             "and post_layernorm get exact-zero gradients",
        norm_key="language_model.model.layers.1.post_attention_layernorm.weight",
        vision_norm_key="vision_tower.vision_model.encoder.layers.1.layer_norm2.weight",
        examples=[
            ("USER: <image>\ndescribe the image . ASSISTANT:", "there is a red circle ."),
            ("USER: <image>\nis there a cat ? ASSISTANT:", "yes , a small cat </s>"),
            ("USER: what color is the box on the left ? <image>\nASSISTANT:", "the box is green"),
        ],
    ),
    dict(
        name="l3rope_5x_bf16_mha_rslora",
        note="layout 5.x, bf16 checkpoint upcast to f32, llama3 rope, CLIP 2 layers, feature layer -1 so every "
             "vision layer matters (only post_layernorm gets zero gradients)",
        norm_key="model.language_model.norm.weight",
        vision_norm_key="model.vision_tower.encoder.layers.1.layer_norm2.weight",
        examples=[
            ("<image>\nUSER: what do you see ? ASSISTANT:", "a tree near the sky"),
            ("<image>\nUSER: is the dot dark ? ASSISTANT:", "it is dark . </s>"),
            ("USER: <image>\nshow me the shape . ASSISTANT:", "one large triangle"),
        ],
    ),
    dict(
        name="llama_text_only",
        note="text-only LlamaForCausalLM f32 (llama3 rope, legacy config), untied",
        norm_key="model.layers.0.input_layernorm.weight",
        vision_norm_key=None,
        examples=[
            ("USER: describe a red circle and a blue square . ASSISTANT:", "there is a red circle ."),
            ("USER: what color is the sky ? ASSISTANT:", "the sky is blue </s>"),
            ("USER: do you see two dog ? ASSISTANT:", "yes , two dog"),
        ],
    ),
]


# ---------------------------------------------------------------------------------------------
# model loading: every parameter trainable, mapped to the checkpoint's key names
# ---------------------------------------------------------------------------------------------
def load_case(mdir: str, text_only: bool, layout: str):
    model = load_model(mdir, text_only)
    model.config.use_cache = False

    ck = checkpoint_tensors(mdir)
    params: dict[str, torch.nn.Parameter] = {}   # checkpoint key -> parameter
    mem_of: dict[str, str] = {}                  # checkpoint key -> in-memory name
    tied_skipped = []
    for n, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(True)
        key = rename_base_key(n, layout)
        if key not in ck:
            # only a tied LM head may be absent from the file; it must share storage with a saved parameter
            assert n == "lm_head.weight", n
            emb = rename_base_key("model.language_model.embed_tokens.weight" if not text_only
                                  else "model.embed_tokens.weight", layout)
            assert params[emb] is p, "lm_head not tied to the embedding"
            tied_skipped.append(n)
            continue
        if key in params:
            assert params[key] is p, key
            continue
        assert p.dtype == torch.float32 and torch.equal(p.detach(), ck[key].float()), key
        params[key] = p
        mem_of[key] = n
    assert set(params) == set(ck), set(ck) ^ set(params)
    # every in-memory parameter is covered (no trainable parameter missing from the checkpoint)
    ids_covered = {id(p) for p in params.values()}
    assert all(id(p) in ids_covered for p in model.parameters())
    return model, params, mem_of, tied_skipped, ck


# ---------------------------------------------------------------------------------------------
# SFT loss
# ---------------------------------------------------------------------------------------------
def sft_loss(model, examples, pv, n_img, dtype=torch.float32):
    n_tokens = sum(len(e["answer_ids"]) for e in examples)
    total, rows = None, []
    for e in examples:
        lp = answer_logps(model, e["prompt_ids"], e["answer_ids"], pv, n_img, dtype)
        nll = -lp.sum()
        total = nll if total is None else total + nll
        rows.append(dict(nll_sum=float(nll.detach()), n_tokens=len(e["answer_ids"]),
                         token_logprobs=[float(v) for v in lp.detach()]))
    return total / n_tokens, rows, n_tokens


def grads_of(model, params, examples, pv, n_img, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    loss, rows, n_tokens = sft_loss(model, examples, pv, n_img, dtype)
    loss.backward()
    g = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), rows, n_tokens, g


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

    torch.manual_seed(0)
    model, params, mem_of, tied_skipped, ck = load_case(mdir, text_only, layout)
    assert bool(tied_skipped) == bool(fix["tied"]), (tied_skipped, fix["tied"])

    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    pv, image_rel = None, None
    if not text_only:
        pv = fixture_pixel_values(mdir, src)
        image_rel = os.path.relpath(os.path.join(src, "image.png"), cdir)

    # the fixture's own reference logprobs are reproduced (loading + expansion are right)
    base_lp, _ = compute_logprobs(model, fix["input_ids"], pv, n_img, use_cache=False)
    d_base = max(abs(a - b) for a, b in zip(base_lp, fix["logprobs"]))
    assert d_base < 1e-5, d_base

    # examples
    examples = []
    for prompt, answer in case["examples"]:
        p_ids = tok.encode(prompt).ids
        a_ids = tok.encode(answer, add_special_tokens=False).ids
        assert p_ids.count(IMAGE_ID) == (0 if text_only else 1), prompt
        assert UNK not in p_ids + a_ids, (prompt, answer, p_ids, a_ids)
        assert 3 <= len(a_ids) <= 8 and IMAGE_ID not in a_ids, answer
        assert EOS not in a_ids[:-1]
        examples.append(dict(image=image_rel, prompt_ids=p_ids, answer_ids=a_ids, _text=(prompt, answer)))
    assert sum(e["answer_ids"][-1] == EOS for e in examples) == 1
    assert len({len(e["answer_ids"]) for e in examples}) > 1
    with open(os.path.join(cdir, "data.jsonl"), "w") as f:
        for e in examples:
            f.write(json.dumps({k: e[k] for k in ("image", "prompt_ids", "answer_ids")}) + "\n")

    loss, rows, n_tokens, grads = grads_of(model, params, examples, pv, n_img)
    loss2, rows2, _, grads2 = grads_of(model, params, examples, pv, n_img)
    deterministic = bool(torch.equal(loss, loss2) and rows == rows2 and
                         all(torch.equal(grads[k], grads2[k]) for k in grads))
    assert deterministic
    assert abs(sum(r["nll_sum"] for r in rows) / n_tokens - float(loss)) < 1e-5

    # tied embeddings: the stored gradient is the sum of the embedding-use and LM-head-use gradients (checked by
    # untying a copy: separate lm_head parameter with the same values)
    tied_check = None
    if fix["tied"]:
        emb_k = next(k for k in params if k.endswith("embed_tokens.weight"))
        mu = copy.deepcopy(model)
        emb_p = mu.get_input_embeddings().weight
        mu.lm_head.weight = torch.nn.Parameter(emb_p.detach().clone())
        assert mu.lm_head.weight is not emb_p
        mu.zero_grad(set_to_none=True)
        lu, _, _ = sft_loss(mu, examples, pv, n_img)
        lu.backward()
        g_emb, g_head = emb_p.grad, mu.lm_head.weight.grad
        tied_check = dict(loss_untied_copy=float(lu.detach()),
                          max_abs_diff_sum_vs_stored=float((g_emb + g_head - grads[emb_k]).abs().max()),
                          embedding_use_grad_norm=float(g_emb.norm()), lm_head_use_grad_norm=float(g_head.norm()))
        assert float(lu) == float(loss) and tied_check["max_abs_diff_sum_vs_stored"] < 1e-6, tied_check
        assert float(g_emb.norm()) > 0 and float(g_head.norm()) > 0
        del mu

    # expected exact zeros: vision layers past the feature layer + vision post_layernorm
    zero_keys = sorted(k for k, g in grads.items() if not bool((g != 0).any()))
    exp_zero = [] if text_only else unused_vision_keys(grads, fix["knobs"], post_layernorm=True)
    assert zero_keys == sorted(exp_zero), (zero_keys, exp_zero)
    assert all(torch.isfinite(g).all() for g in grads.values())

    # ----- float64 verification: autograd f64 + central finite differences ----------------------------------
    model64 = copy.deepcopy(model).double()
    model64.set_attn_implementation("sdpa")
    names64 = dict(model64.named_parameters())
    params64 = {k: names64[mem_of[k]] for k in params}
    assert all(params64[k].shape == params[k].shape and params64[k].dtype == torch.float64 for k in params)
    if fix["tied"]:
        assert model64.lm_head.weight is params64[next(k for k in params if k.endswith("embed_tokens.weight"))]
    pv64 = None if pv is None else pv.double()

    gen = torch.Generator().manual_seed(4321)
    emb_key = next(k for k in params if k.endswith("embed_tokens.weight"))
    prompt_toks = sorted({t for e in examples for t in e["prompt_ids"] if t != IMAGE_ID})
    targets = []  # (what, key, index)
    for _ in range(2):
        row = prompt_toks[int(torch.randint(len(prompt_toks), (1,), generator=gen))]
        col = int(torch.randint(params[emb_key].shape[1], (1,), generator=gen))
        targets.append(("embedding row used by a prompt", emb_key, (row, col)))
    fd_keys = [("norm weight", case["norm_key"])]
    if not text_only:
        fd_keys += [("vision patch_embedding", next(k for k in params if k.endswith("patch_embedding.weight"))),
                    ("last used vision layer norm", case["vision_norm_key"])]
    for what, key in fd_keys:
        assert key in params, key
        for _ in range(2):
            flat = int(torch.randint(params[key].numel(), (1,), generator=gen))
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), params[key].shape))
            targets.append((what, key, idx))

    with f64_exact():
        loss64, _, _, grads64 = grads_of(model64, params64, examples, pv64, n_img, torch.float64)
        fd_rows = []
        eps = 1e-5
        for what, key, idx in targets:
            P = params64[key]
            with torch.no_grad():
                orig = P[idx].item()
                P[idx] = orig + eps
                lp, _, _ = sft_loss(model64, examples, pv64, n_img, torch.float64)
                P[idx] = orig - eps
                lm, _, _ = sft_loss(model64, examples, pv64, n_img, torch.float64)
                P[idx] = orig
            fd = (float(lp) - float(lm)) / (2 * eps)
            g32 = float(grads[key][idx])
            fd_rows.append(dict(what=what, key=key, index=list(idx), eps=eps, finite_difference_f64=fd,
                                autograd_f32=g32, autograd_f64=float(grads64[key][idx]),
                                rel_err_f32_vs_fd=abs(g32 - fd) / max(abs(fd), 1e-30),
                                rel_err_f64_vs_fd=abs(float(grads64[key][idx]) - fd) / max(abs(fd), 1e-30)))
    gmax = max(float(g.abs().max()) for g in grads64.values())
    g_abs = max(float((grads[k].double() - grads64[k]).abs().max()) for k in grads)
    # CLIP k_proj.bias: softmax over keys is invariant to q.b_k (the same for every key), so its true gradient is
    # 0; float32 autograd leaves rounding noise there (~1e-8), float64 ~1e-17.  Compared by absolute error only.
    analytic_zero = sorted(k for k in grads if k not in zero_keys and float(grads64[k].norm()) < 1e-12 * gmax)
    assert all(re.search(r"vision_tower\..*self_attn\.k_proj\.bias$", k) for k in analytic_zero), analytic_zero
    g_rel = max(float((grads[k].double() - grads64[k]).norm() / max(float(grads64[k].norm()), 1e-30))
                for k in grads if k not in zero_keys and k not in analytic_zero)
    az_abs = max([float(grads[k].abs().max()) for k in analytic_zero], default=0.0)
    assert az_abs < 1e-6 * gmax, az_abs
    for r in fd_rows:
        assert r["rel_err_f32_vs_fd"] < 1e-3, r
        assert r["rel_err_f64_vs_fd"] < 1e-6, r
    assert abs(float(loss64) - float(loss)) < 1e-5, (float(loss64), float(loss))
    assert g_rel < 1e-4, g_rel
    assert all(not bool((grads64[k] != 0).any()) for k in zero_keys)

    out = {k: grads[k].float().contiguous() for k in sorted(grads)}
    assert set(out) == set(ck) and all(out[k].shape == ck[k].shape for k in ck)
    save_file(out, os.path.join(cdir, "grads.safetensors"), metadata={"format": "pt"})

    exp = {
        "case": name,
        "note": case["note"],
        "loss": float(loss),
        "n_tokens": n_tokens,
        "model_dir": os.path.relpath(mdir, cdir),
        "paths_relative_to": "the directory of this file",
        "definition": DEFINITION,
        "per_example": [r | {"prompt_text": e["_text"][0], "answer_text": e["_text"][1]}
                        for r, e in zip(rows, examples)],
        "image_token_id": None if text_only else IMAGE_ID,
        "num_image_patches": n_img,
        "model_layout": layout,
        "model_dtype": fix["dtype"],
        "compute_dtype": "f32",
        "tied": bool(fix["tied"]),
        "tied_grad_key": emb_key if fix["tied"] else None,
        "vision_feature_layer": None if text_only else fix["knobs"]["vision_feature_layer"],
        "grad_tensors": len(out),
        "zero_grad_keys": zero_keys,
        "analytically_zero_grad_keys": analytic_zero,
        "analytically_zero_note": "CLIP attention k_proj.bias: adding q.b_k to every attention score of a query "
                                  "leaves the softmax unchanged, so the true gradient is 0; the stored f32 values "
                                  "are autograd rounding noise (compare with an absolute tolerance)",
        "grad_max_abs": max(float(g.abs().max()) for g in grads.values()),
        "checks": {
            "deterministic_recompute": deterministic,
            "tied_sum_check": tied_check,
            "fixture_logprobs_maxdiff": d_base,
            "f64_loss": float(loss64),
            "f32_vs_f64_grad_max_abs_diff": g_abs,
            "f32_vs_f64_grad_max_rel_norm_diff": g_rel,
            "f32_vs_f64_grad_max_rel_norm_diff_excludes": "zero_grad_keys and analytically_zero_grad_keys",
            "analytically_zero_f32_max_abs": az_abs,
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
    llava_root, out_root = derived_fixture_dirs("sft")
    print(f"versions: {VERSIONS}")
    for case in CASES:
        e = run_case(case, llava_root, out_root)
        c = e["checks"]
        print(f"\n{e['case']}: loss {e['loss']:.8f} (f64 {c['f64_loss']:.8f}) n_tokens {e['n_tokens']} "
              f"size {dir_size(os.path.join(out_root, e['case'])) / 1024:.1f} KiB")
        for i, r in enumerate(e["per_example"]):
            print(f"  example {i}: {r['n_tokens']} answer tokens, nll sum {r['nll_sum']:.5f}")
        print(f"  grad tensors {e['grad_tensors']}; zero-grad tensors {len(e['zero_grad_keys'])}: "
              f"{e['zero_grad_keys']}")
        if c["tied_sum_check"]:
            print(f"  tied: stored embedding grad vs (embedding-use + lm_head-use) of an untied copy: max abs diff "
                  f"{c['tied_sum_check']['max_abs_diff_sum_vs_stored']:.1e}")
        print(f"  analytically zero (f32 noise max {c['analytically_zero_f32_max_abs']:.1e}): "
              f"{e['analytically_zero_grad_keys']}")
        print(f"  f32 vs f64 grads: max abs {c['f32_vs_f64_grad_max_abs_diff']:.2e}, "
              f"max rel (per tensor norm) {c['f32_vs_f64_grad_max_rel_norm_diff']:.2e}; "
              f"max |grad| {e['grad_max_abs']:.3e}")
        for r in c["finite_difference"]:
            print(f"  FD [{r['what']}] {r['key']}{r['index']}: fd64 {r['finite_difference_f64']:.8e} "
                  f"autograd32 {r['autograd_f32']:.8e} autograd64 {r['autograd_f64']:.8e} "
                  f"rel err f32 {r['rel_err_f32_vs_fd']:.2e} f64 {r['rel_err_f64_vs_fd']:.2e}")
    print(f"\ntotal size of {out_root}: {dir_size(out_root) / 1024:.1f} KiB")


if __name__ == "__main__":
    sys.exit(main())
