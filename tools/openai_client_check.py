"""Drives a running `rlaifd serve` with the official `openai` Python client through every API feature the README
lists, and parses /metrics with `prometheus_client`. Run by daemon/tests/openai_client.rs (the venv comes from
tools/datasets-venv.sh); exits non-zero with the failed check's message.

usage: openai_client_check.py HOST:PORT IMAGE.png
"""

import base64
import io
import json
import sys
import threading
import urllib.request

import openai
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

addr, png_path = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=120)
png = open(png_path, "rb").read()
checks = []


def check(name):
    def wrap(f):
        f()
        checks.append(name)
        print(f"ok   {name}", flush=True)
        return f

    return wrap


def data_url(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text, image=None, mime="image/png"):
    parts = []
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image, mime)}})
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def chat(messages=None, **kw):
    return client.chat.completions.create(
        model=model, messages=messages or [user("Describe the image.", png)], **kw
    )


def metrics():
    with urllib.request.urlopen(f"http://{addr}/metrics") as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m, name):
    return sum(v for (n, _), v in m.items() if n == name)


models = client.models.list().data
assert len(models) == 1, models
model = models[0].id


@check("models.retrieve")
def _():
    m = client.models.retrieve(model)
    assert m.id == model and m.object == "model" and m.created > 0, m
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("an unknown model id must be 404")
    except openai.NotFoundError as e:
        assert model in str(e), e


@check("stream equals non-stream, usage in the last chunk")
def _():
    for n in (1, 3):
        full = chat(seed=5, temperature=0.9, max_tokens=30, n=n)
        chunks = list(
            chat(seed=5, temperature=0.9, max_tokens=30, n=n, stream=True, stream_options={"include_usage": True})
        )
        texts = [""] * n
        finish = [None] * n
        for c in chunks[:-1]:
            assert c.object == "chat.completion.chunk" and c.usage is None, c
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
                finish[ch.index] = ch.finish_reason or finish[ch.index]
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None, last
        assert texts == [c.message.content for c in full.choices], (texts, full)
        assert finish == [c.finish_reason for c in full.choices], (finish, full)
        assert last.usage.model_dump() == full.usage.model_dump(), (last.usage, full.usage)
        assert chunks[0].id == full.id and chunks[0].model == model
    # Without include_usage no chunk carries usage.
    plain = list(chat(seed=5, temperature=0.9, max_tokens=10, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason, plain[-1]


@check("logprobs and top_logprobs")
def _():
    r = chat(seed=3, temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for t in content:
        assert t.logprob <= 0.0 and len(t.top_logprobs) == 3, t
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True), t
        # Greedy: the chosen token is the most likely one.
        assert abs(t.logprob - lps[0]) < 1e-6, t
        assert bytes(t.bytes) == t.token.encode(), t
    # Streamed, the same entries arrive chunk by chunk.
    s = list(chat(seed=3, temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in s for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert chat(max_tokens=4).choices[0].logprobs is None
    try:
        chat(max_tokens=4, logprobs=True, top_logprobs=21)
        raise AssertionError("top_logprobs 21 must be refused")
    except openai.BadRequestError as e:
        assert "top_logprobs" in str(e), e


@check("stop and max_completion_tokens")
def _():
    base = chat(seed=11, temperature=0.9, max_tokens=40).choices[0].message.content
    words = base.split()
    assert len(words) >= 4, base
    stop = words[2]
    cut = chat(seed=11, temperature=0.9, max_tokens=40, stop=[stop, "never there"])
    assert cut.choices[0].message.content == base[: base.index(stop)], (base, stop, cut)
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(seed=11, temperature=0.9, max_tokens=40, stop=[stop], stream=True)
        if c.choices
    )
    assert streamed == base[: base.index(stop)], (streamed, base, stop)
    short = chat(seed=11, temperature=0.9, max_completion_tokens=3, max_tokens=40)
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason in ("length", "stop"), short


@check("multi-turn with system and developer roles; image tokens in usage")
def _():
    one = chat([user("Describe the image.", png)], seed=1, max_tokens=8)
    text_only = chat([user("Describe the image.")], seed=1, max_tokens=8)
    assert one.usage.prompt_tokens > text_only.usage.prompt_tokens + 8, (one.usage, text_only.usage)
    convo = [
        {"role": "system", "content": "You describe images."},
        user("Describe the image.", png),
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "Describe it again."},
    ]
    two = chat(convo, seed=1, max_tokens=8)
    assert two.choices[0].message.content is not None
    assert two.usage.prompt_tokens > one.usage.prompt_tokens, (two.usage, one.usage)
    dev = chat([{"role": "developer", "content": "Be brief."}, user("Describe the image.", png)], max_tokens=4)
    assert dev.choices[0].message.role == "assistant"
    try:
        chat([user("Describe the image.", png), {"role": "assistant", "content": "x"}], max_tokens=4)
        raise AssertionError("a conversation ending with the assistant must be refused")
    except openai.BadRequestError as e:
        assert "last message must be from the user" in str(e), e


@check("PNG, JPEG, WebP, GIF and BMP images")
def _():
    img = Image.open(io.BytesIO(png)).convert("RGB")

    def enc(fmt, **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b.getvalue()

    want = chat([user("Describe the image.", png)], seed=9, temperature=0.0, max_tokens=16).choices[0].message.content
    for fmt, mime, lossless in [
        ("BMP", "image/bmp", True),
        ("WEBP", "image/webp", True),
        ("GIF", "image/gif", False),
        ("JPEG", "image/jpeg", False),
    ]:
        extra = {"lossless": True} if fmt == "WEBP" else {}
        r = chat([user("Describe the image.", enc(fmt, **extra), mime)], seed=9, temperature=0.0, max_tokens=16)
        got = r.choices[0].message.content
        assert got, (fmt, r)
        if lossless:
            # The same pixels: the same greedy answer as the PNG.
            assert got == want, (fmt, got, want)


@check("16 concurrent clients get what they get one at a time, sharing decode steps")
def _():
    kw = dict(temperature=0.9, max_tokens=24)
    alone = [chat(seed=100 + i, **kw).choices[0].message.content for i in range(16)]
    before = metrics()
    together = [None] * 16
    errors = []

    def one(i):
        try:
            together[i] = chat(seed=100 + i, **kw).choices[0].message.content
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert together == alone, (together, alone)
    after = metrics()
    steps = total(after, "rlaifd_batch_steps_total") - total(before, "rlaifd_batch_steps_total")
    rows = total(after, "rlaifd_batch_answer_steps_total") - total(before, "rlaifd_batch_answer_steps_total")
    assert steps > 0 and rows / steps >= 2.0, f"mean batch {rows}/{steps}: the requests did not share steps"
    print(f"     mean batch over the concurrent requests: {rows / steps:.1f} answers per step", flush=True)


@check("errors as OpenAI's error objects")
def _():
    for kw, needle in [
        (dict(n=1000), "max_n"),
        (dict(stream=True, extra_body={"best_of": 2}), "best_of cannot be combined"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]:
        try:
            chat(max_tokens=4, **kw)
            raise AssertionError(f"{kw} must be refused")
        except openai.BadRequestError as e:
            assert needle in str(e) and e.status_code == 400, (kw, e)
    try:
        chat([user("Describe the image.", b"GIF89a\x10\x00", "image/gif")], max_tokens=4)
        raise AssertionError("a truncated GIF must be refused")
    except openai.BadRequestError as e:
        assert "request image" in str(e), e


@check("prometheus_client parses /metrics")
def _():
    m = metrics()
    names = {n for n, _ in m}
    for want in [
        "rlaifd_requests_total",
        "rlaifd_request_duration_seconds_bucket",
        "rlaifd_engine_chat_requests_total",
        "rlaifd_batch_steps_total",
        "rlaifd_batch_answer_steps_total",
        "rlaifd_serving_checkpoint",
    ]:
        assert want in names, (want, sorted(names))
    ok = sum(v for (n, l), v in m.items() if n == "rlaifd_requests_total" and dict(l).get("status") == "200")
    assert ok >= 40, ok


print(json.dumps({"checks": checks}))
