#!/usr/bin/env python3
"""bench_serve.py: the vLLM benchmark_serving method against OpenAI-compatible servers (not a test).

N requests (prompts of --prompt-words words drawn at random from common words that are one token
each in the Llama 2 and SmolLM2 vocabularies, distinct so no prompt cache helps; output lengths drawn from an exponential distribution of mean --mean-output, at least
1, EOS ignored, as scripts/bench_batch.sh draws them) sent to POST /v1/completions with
stream: true, arriving as a Poisson process at each --rates value (requests/s; "inf": all at
once), after one warm-up request. Per run: request throughput, output tok/s, TTFT, TPOT and inter-token latency (the gaps
between streamed chunks) p50 and p99.

Each --server LABEL=COMMAND is started per run ({port} in COMMAND becomes a free port), waited for until GET /health answers 200, measured, and stopped; the
servers alternate rate by rate (A at 1/s, B at 1/s, A at 4/s, ...), so the memory bandwidth's drift
over minutes lands on both. Prints one line per run as it is measured and a markdown table at the end.

  python3 scripts/bench_serve.py \\
    --server 'fastgen=./generate --checkpoint models/smollm2-135m-instruct.bin --serve --port {port} --max-seqs 16' \\
    --server 'llama-server=/path/llama-server -m models/SmolLM2-135M-Instruct.Q4_1.gguf --port {port} -np 16 -c 32768 -cb'
"""
import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time


# Common words that are one token each in the Llama 2 (sentencepiece) and SmolLM2 (BPE) vocabularies.
WORDS = [" the", " a", " of", " and", " to", " in", " is", " it", " that", " was", " he", " for"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc, timeout_s):
    end = time.time() + timeout_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health 200 within {timeout_s} s")


def model_name(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/v1/models")
    return json.loads(c.getresponse().read())["data"][0]["id"]


def one_request(port, model, prompt, max_tokens, out):
    """Streams one completion; fills out with send time, chunk arrival times and the usage."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    out["sent"] = time.perf_counter()
    out["chunks"] = []
    out["retries"] = 0
    try:
        # A server whose listen backlog overflows resets some connections of a burst (httplib 0.11's is
        # 5): the request is sent again, as a client would, its TTFT counted from the first try.
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                break
            except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
                if out["retries"] == 100:
                    raise
                out["retries"] += 1
                time.sleep(0.02)
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
            return
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            j = json.loads(data)
            if j.get("usage"):
                out["usage"] = j["usage"]
            if j.get("choices") and j["choices"][0].get("text"):
                out["chunks"].append(time.perf_counter())
        out["done"] = time.perf_counter()
    except Exception as e:  # noqa: BLE001 (any failure is reported as the request's error)
        out["error"] = repr(e)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_load(port, workload, rate, seed):
    model = model_name(port)
    warm = {}
    one_request(port, model, workload[0][0], 4, warm)  # the first request's one-off costs stay out
    if "error" in warm:
        raise RuntimeError(f"the warm-up request failed: {warm['error']}")
    rng = random.Random(seed)
    results = [dict() for _ in workload]
    threads = []
    t0 = time.perf_counter()
    at = 0.0
    for (prompt, max_tokens), out in zip(workload, results):
        if rate != float("inf"):
            at += rng.expovariate(rate)
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t = threading.Thread(target=one_request, args=(port, model, prompt, max_tokens, out), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r and r["chunks"]]
    ttft = [(r["chunks"][0] - r["sent"]) * 1e3 for r in ok]
    tpot, itl, out_tokens = [], [], 0
    for r in ok:
        n = r.get("usage", {}).get("completion_tokens", len(r["chunks"]))
        out_tokens += n
        if n > 1:
            tpot.append((r["done"] - r["chunks"][0]) * 1e3 / (n - 1))
        itl += [(b - a) * 1e3 for a, b in zip(r["chunks"], r["chunks"][1:])]
    prompt_tokens = sorted({r.get("usage", {}).get("prompt_tokens", -1) for r in ok})
    retried = sum(1 for r in results if r.get("retries"))
    dur = t1 - t0
    return {
        "requests": len(ok), "errors": errors, "retried": retried, "duration_s": dur, "req_per_s": len(ok) / dur,
        "out_tok_per_s": out_tokens / dur, "out_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
        "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
    }


def start_server(command, log_path):
    port = free_port()
    cmd = command.replace("{port}", str(port))
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port, log


def stop_server(proc, log):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", action="append", required=True, help="LABEL=COMMAND with {port} in it")
    ap.add_argument("--rates", default="1,4,16,inf", help="requests/s, comma-separated; inf = all at once")
    ap.add_argument("--n", type=int, default=32, help="requests per run")
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--mean-output", type=float, default=128)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logs", default="/tmp/fastgen-bench-serve", help="a folder for the servers' logs")
    ap.add_argument("--ready-timeout", type=float, default=300)
    a = ap.parse_args()

    servers = []
    for s in a.server:
        if "=" not in s or "{port}" not in s:
            sys.exit(f"bench_serve.py: --server must be LABEL=COMMAND with {{port}} in it, got {s!r}")
        label, cmd = s.split("=", 1)
        servers.append((label, cmd))
    rates = [float(r) for r in a.rates.split(",")]
    rng = random.Random(a.seed)
    # Distinct prompts, so that no engine's prompt cache serves one request from another's.
    workload = [("".join(rng.choice(WORDS) for _ in range(a.prompt_words)),
                 max(1, min(a.max_output, int(rng.expovariate(1 / a.mean_output))))) for _ in range(a.n)]
    os.makedirs(a.logs, exist_ok=True)
    print(f"# {a.n} requests per run, prompt {a.prompt_words} random words, outputs exponential mean {a.mean_output:g} "
          f"({sum(m for _, m in workload)} tokens in all), streaming, greedy, EOS ignored", flush=True)

    rows = []
    for rate in rates:
        for label, cmd in servers:
            log_path = os.path.join(a.logs, f"{label}-{rate:g}.log")
            proc, port, log = start_server(cmd, log_path)
            try:
                wait_healthy(port, proc, a.ready_timeout)
                m = run_load(port, workload, rate, a.seed + 1)
            finally:
                stop_server(proc, log)
            rows.append((label, rate, m))
            err = f", {len(m['errors'])} errors (first: {m['errors'][0]})" if m["errors"] else ""
            err += f", {m['retried']} requests sent again after a reset connection" if m["retried"] else ""
            print(f"{label:>14} rate {rate:>4g}/s: {m['requests']} requests in {m['duration_s']:.1f} s, "
                  f"{m['req_per_s']:.2f} req/s, {m['out_tok_per_s']:.1f} out tok/s, TTFT p50/p99 "
                  f"{m['ttft_p50']:.0f}/{m['ttft_p99']:.0f} ms, TPOT p50/p99 {m['tpot_p50']:.1f}/{m['tpot_p99']:.1f} ms, "
                  f"ITL p50/p99 {m['itl_p50']:.1f}/{m['itl_p99']:.1f} ms, prompt tokens {m['prompt_tokens']}{err}",
                  flush=True)

    print("\n| server | rate (req/s) | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | ITL p99 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, rate, m in rows:
        print(f"| {label} | {rate:g} | {m['req_per_s']:.2f} | {m['out_tok_per_s']:.1f} | {m['ttft_p50']:.0f} ms | "
              f"{m['ttft_p99']:.0f} ms | {m['tpot_p50']:.1f} ms | {m['tpot_p99']:.1f} ms | {m['itl_p50']:.1f} ms | "
              f"{m['itl_p99']:.1f} ms |")
    if any(m["errors"] for _, _, m in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
