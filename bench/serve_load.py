"""Load benchmark of ``hires serve``: N requests from C concurrent clients vs the same requests sent
one at a time, on a tiny model (random weights, CPU) served on a loopback port by a child process
(so that the client threads do not share the server's interpreter).

    .venv/bin/python bench/serve_load.py                      # 64 requests, 16 clients
    .venv/bin/python bench/serve_load.py --requests 128 --concurrency 32 --max-tokens 64 --method slime

Every answer is checked: each request is one of a few distinct (question, image) cases, all greedy,
so every answer must equal that case's answer from ``HiresLMM.generate`` (computed on a separate
copy of the model). Nothing may be lost: every request must come back 200 with its full usage.
Prints throughput (requests/s, completion tokens/s), latency percentiles and the engine's largest
batch. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue

from PIL import Image, ImageDraw

SIZES = [(64, 48), (320, 240), (200, 500), (640, 480), (96, 96), (500, 260), (48, 300), (260, 260)]


def picture(w: int, h: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (40 + 25 * seed % 200, 90, 160))
    d = ImageDraw.Draw(img)
    for k in range(5):
        x, y = (k * 31 + seed * 13) % max(1, w - 16), (k * 19 + seed * 5) % max(1, h - 16)
        d.rectangle((x, y, x + w // 4, y + h // 5), fill=((k * 60 + seed * 40) % 256, 180 - 25 * k, 35 * k))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=600)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def get(self, path: str) -> dict:
        self.conn.request("GET", path)
        return json.loads(self.conn.getresponse().read())

    def close(self) -> None:
        self.conn.close()


def run(jobs: list[tuple[int, dict]], host: str, port: int, concurrency: int) -> tuple[float, list]:
    """Send ``jobs`` (case index, body) from ``concurrency`` client threads; per job (case, status,
    body, latency), in job order."""
    results: list = [None] * len(jobs)
    q: Queue = Queue()
    for i, job in enumerate(jobs):
        q.put((i, job))

    def worker() -> None:
        c = Client(host, port)
        try:
            while True:
                try:
                    i, (case, body) = q.get_nowait()
                except Empty:
                    return
                t0 = time.perf_counter()
                try:
                    status, out = c.post("/v1/chat/completions", body)
                except Exception as e:  # noqa: BLE001 - counted as lost below
                    status, out = -1, {"error": repr(e)}
                    c.close()
                    c = Client(host, port)
                results[i] = (case, status, out, time.perf_counter() - t0)
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def report(name: str, seconds: float, results: list) -> dict:
    ok = [r for r in results if r is not None and r[1] == 200]
    tokens = sum(r[2]["usage"]["completion_tokens"] for r in ok)
    lat = sorted(r[3] for r in ok)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    row = {"name": name, "seconds": seconds, "requests": len(ok), "req_s": len(ok) / seconds,
           "tok_s": tokens / seconds, "p50": p(0.5), "p95": p(0.95), "mean": statistics.fmean(lat) if lat else 0.0}
    print(f"  {name:<28} {row['requests']:>4} ok in {seconds:7.2f} s   {row['req_s']:7.2f} req/s   "
          f"{row['tok_s']:8.1f} completion tok/s   latency p50 {row['p50']:.3f} s  p95 {row['p95']:.3f} s")
    return row


def serve_forever(model_dir: str, name: str, port: int, max_batch: int, max_waiting: int) -> None:
    """The server process: ``hires serve`` on ``port`` (what the command line does, without its parsing)."""
    import uvicorn

    from hires_lmm.model import HiresLMM
    from hires_lmm.serve import ServeConfig
    from hires_lmm.serve.app import create_app

    model = HiresLMM.from_pretrained(model_dir)
    app = create_app(model, ServeConfig(served_model_name=name, max_batch=max_batch, max_waiting=max_waiting))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--method", default="llava-uhd")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--cases", type=int, default=8, help="distinct (question, image) cases, at most 8")
    ap.add_argument("--text-only", action="store_true", help="no images: decoding dominates, not visual encoding")
    args = ap.parse_args(argv)

    from hires_lmm.methods import build_model
    from hires_lmm.model import HiresLMM

    name = "bench-tiny"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / name
        build_model(args.method, tiny=True).save_pretrained(model_dir)
        host, port = "127.0.0.1", free_port()
        server = multiprocessing.get_context("spawn").Process(
            target=serve_forever, args=(str(model_dir), name, port, args.max_batch, max(256, args.requests)), daemon=True)
        server.start()
        ref = HiresLMM.from_pretrained(model_dir)
        cases = []
        for i, (w, h) in enumerate(SIZES[: max(1, min(args.cases, len(SIZES)))]):
            img = picture(w, h, i)
            q = f"Case {i}: what is in this {w}x{h} picture?"
            parts = [] if args.text_only else [{"type": "image_url", "image_url": {"url": data_url(img)}}]
            body = {"model": name, "temperature": 0, "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": parts + [{"type": "text", "text": q}]}]}
            prompt, images = (q, []) if args.text_only else ("<image>\n" + q, [img])
            # the server drops a character cut off by max_tokens (never sends a lone U+FFFD); generate keeps it
            want = ref.generate([prompt], [images], max_new_tokens=args.max_tokens, template="tokenizer")[0].rstrip("\ufffd")
            cases.append((body, want))
        jobs = [(k % len(cases), cases[k % len(cases)][0]) for k in range(args.requests)]

        def engine_stats() -> dict:
            c = Client(host, port)  # a new connection: an idle keep-alive one is closed after 5 s
            try:
                return c.get("/health")["engine"]
            finally:
                c.close()

        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    engine_stats()
                    break
                except OSError:
                    if not server.is_alive() or time.monotonic() > deadline:
                        print("the server did not start", file=sys.stderr)
                        return 1
                    time.sleep(0.2)
            kind = "text-only" if args.text_only else "image+question"
            print(f"hires serve load benchmark: {args.method} tiny model (CPU), {args.requests} requests of "
                  f"{args.max_tokens} tokens over {len(cases)} distinct {kind} cases, max batch {args.max_batch}")
            run(jobs[: len(cases)], host, port, 1)  # warm-up
            e0 = engine_stats()
            seq_s, seq = run(jobs, host, port, 1)
            e1 = engine_stats()
            conc_s, conc = run(jobs, host, port, args.concurrency)
            engine = engine_stats()
        finally:
            server.terminate()
            server.join(30)

        failures = 0
        for label, results in (("sequential", seq), ("concurrent", conc)):
            lost = [i for i, r in enumerate(results) if r is None or r[1] != 200]
            wrong = [i for i, r in enumerate(results) if r is not None and r[1] == 200
                     and r[2]["choices"][0]["message"]["content"] != cases[r[0]][1]]
            if lost or wrong:
                failures += 1
                print(f"  {label}: {len(lost)} lost {lost[:10]}, {len(wrong)} wrong {wrong[:10]}", file=sys.stderr)
        print("  throughput:")
        a = report("sequential (1 client)", seq_s, seq)
        b = report(f"concurrent ({args.concurrency} clients)", conc_s, conc)
        steps = lambda x, y: (y["decode_steps"] - x["decode_steps"], y["prefill_batches"] - x["prefill_batches"])  # noqa: E731
        (sd, sp), (cd, cp) = steps(e0, e1), steps(e1, engine)
        print(f"  speed-up {b['req_s'] / a['req_s']:.2f}x requests/s; LLM calls: sequential {sd} decode steps + "
              f"{sp} prefills, concurrent {cd} decode steps + {cp} prefills; largest batch "
              f"{engine['max_batch_size_seen']}, largest prefill group {engine['max_prefill_batch_seen']}, "
              f"{engine['requests_failed']} failed")
        for label, x, y in (("sequential", e0, e1), ("concurrent", e1, engine)):
            print(f"  engine thread, {label}: prefill {y['prefill_s'] - x['prefill_s']:.2f} s, decode "
                  f"{y['decode_s'] - x['decode_s']:.2f} s, sampling and detokenising {y['sample_s'] - x['sample_s']:.2f} s")
        ok = failures == 0 and all(r is not None and r[1] == 200 for r in seq + conc)
        print(f"  correctness: {'all' if ok else 'NOT all'} {2 * args.requests} answers equal HiresLMM.generate's; "
              f"{sum(r is None or r[1] != 200 for r in seq + conc)} lost")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
