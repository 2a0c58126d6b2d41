#!/usr/bin/env python3
"""Continuous batching, measured (BENCHMARKS.md, "Daemon: continuous batching"): against a running `rlaifd serve`,
ROUNDS rounds of (a) 16 requests one after another from one client and (b) 16 clients at once, one request each;
every request a seeded image caption of MAX_TOKENS tokens (`ignore_eos`, as vLLM's serving benchmark). Prints per round and the medians: completion
tokens per second over the wall time of the 16 requests, and the p50/p99 request latency. Stdlib only.
Usage: serve_batching.py --addr HOST:PORT --image PNG [--rounds 5] [--clients 16] [--max-tokens 48] [--label X]"""
import argparse, base64, json, statistics, threading, time, urllib.request


def request(addr, body):
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 200
        out = json.loads(r.read())
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    b64 = base64.b64encode(open(a.image, "rb").read()).decode()
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}, {"type": "text", "text": "Describe the image."}]

    def body(i):
        return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": a.max_tokens,
                           "temperature": 0.9, "seed": 1000 + i, "ignore_eos": True}).encode()

    bodies = [body(i) for i in range(a.clients)]
    request(a.addr, bodies[0])  # warm-up
    rows = {"sequential": [], "concurrent": []}
    for r in range(a.rounds):
        t0 = time.perf_counter()
        seq = [request(a.addr, b) for b in bodies]
        wall = time.perf_counter() - t0
        rows["sequential"].append((sum(t for _, t in seq) / wall, [l for l, _ in seq]))
        res = [None] * a.clients

        def one(i):
            res[i] = request(a.addr, bodies[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows["concurrent"].append((sum(t for _, t in res) / wall, [l for l, _ in res]))
        print(f"round {r + 1}: sequential {rows['sequential'][-1][0]:.0f} tok/s, {a.clients} concurrent {rows['concurrent'][-1][0]:.0f} tok/s", flush=True)
    print(f"\n{a.label} medians over {a.rounds} rounds ({a.clients} requests each):")
    print(f"{'mode':<12} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    med = {}
    for mode, v in rows.items():
        tps = statistics.median(x for x, _ in v)
        lat = [l * 1000 for _, ls in v for l in ls]
        med[mode] = tps
        print(f"{mode:<12} {tps:>8.0f} {pct(lat, 50):>8.1f} {pct(lat, 99):>8.1f}")
    ratios = [c[0] / s[0] for s, c in zip(rows["sequential"], rows["concurrent"])]
    print(f"concurrent / sequential tokens/s: median {statistics.median(ratios):.2f}x (per round: {', '.join(f'{x:.2f}' for x in ratios)})")


main()
