#!/usr/bin/env python3
"""Chat-template fixtures for engine/tests/chat_template.rs: each template (written for these tests, in the styles
the model families use: ChatML with image parts, [INST] blocks, header ids with a default system turn) rendered by
transformers' own `apply_chat_template` for one user turn with the generation prompt, as rlaifd builds the turn (a
multimodal model's content is a list of parts, the image first; a text model's a string), with the fixture
tokenizer's bos/eos. Output: tests/fixtures/chat/cases.json. Run: tools/run_fixture_gen.sh gen_chat_fixtures.py
--out tests/fixtures/chat (or tools/gen_chat_fixtures.sh)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import transformers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import write_json  # noqa: E402

CHATML = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('a conversation starts with the user') }}{% endif %}"
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'].strip() }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<vision_start><image><vision_end>{% elif part['type'] == 'text' %}"
    "{{ part['text'].strip() }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% set ns = namespace(text='', images=0) %}"
    "{% if message['content'] is string %}{% set ns.text = message['content'] %}{% else %}"
    "{% for part in message['content'] %}{% if part.type == 'image' %}{% set ns.images = ns.images + 1 %}"
    "{% else %}{% set ns.text = ns.text + part.text %}{% endif %}{% endfor %}{% endif %}"
    "{{ '<image>\\n' * ns.images }}{{ ns.text | trim }} [/INST]{% elif message['role'] == 'assistant' %}"
    " {{ message['content'] }}{{ eos_token }}{% endif %}{% if not loop.last %}\\n{% endif %}{% endfor %}")

HEADERS = (
    "{% set ns = namespace(system='You describe images.') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n{{ ns.system | trim }}<|eot_id|>"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

TEMPLATES = {"chatml": CHATML, "inst": INST, "headers": HEADERS}
PROMPTS = ["Describe the image.", "  how many red circles are there? ", "list the shapes,\nthen their colours"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok_file = os.path.join(root, "tests/fixtures/qwen_vl/qwen25_native_f32_gqa/model/tokenizer.json")
    cases = []
    for name, template in TEMPLATES.items():
        tok = PreTrainedTokenizerFast(tokenizer_file=tok_file, bos_token="<s>", eos_token="</s>",
                                      chat_template=template)
        for multimodal in (True, False):
            for image in ((True, False) if multimodal else (False,)):
                for prompt in PROMPTS:
                    if multimodal:
                        parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
                        messages = [{"role": "user", "content": parts}]
                    else:
                        messages = [{"role": "user", "content": prompt}]
                    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                    cases.append(dict(template=name, multimodal=multimodal, image=image, prompt=prompt,
                                      expected=text))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "cases.json"), dict(
        templates=TEMPLATES, bos_token="<s>", eos_token="</s>", cases=cases,
        versions=dict(transformers=transformers.__version__)))
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
