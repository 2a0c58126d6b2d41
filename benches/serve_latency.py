#!/usr/bin/env python3
"""Chat latency of a running `rlaifd serve` by loop stage: one client sends the same small request back to back
while the daemon samples, labels, trains and gates; each request is tagged with the stage `rlaifd ctl status`
reported just before it. Prints p50/p90/p99 per stage. Stdlib only.
Usage: serve_latency.py --addr 127.0.0.1:PORT --socket STATE/control.sock --seconds 120 [--image PNG]"""
import argparse, base64, json, socket, statistics, time, urllib.request


def status(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(b'{"cmd":"status"}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--image")
    a = ap.parse_args()
    content = [{"type": "text", "text": "Describe the image."}]
    if a.image:
        b64 = base64.b64encode(open(a.image, "rb").read()).decode()
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}})
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 32, "temperature": 0, "seed": 1}).encode()
    by_stage = {}
    t_end = time.time() + a.seconds
    while time.time() < t_end:
        st = status(a.socket)
        stage = st["stage"]
        if stage == "idle" and st.get("open_iteration") is None:
            stage = "idle"
        req = urllib.request.Request(f"http://{a.addr}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            r.read()
        by_stage.setdefault(stage, []).append((time.perf_counter() - t0) * 1000)
    print(f"{'stage':<12} {'requests':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for stage, v in sorted(by_stage.items()):
        v.sort()
        q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
        print(f"{stage:<12} {len(v):>8} {q(0.5):>8.1f} {q(0.9):>8.1f} {q(0.99):>8.1f}")


if __name__ == "__main__":
    main()
