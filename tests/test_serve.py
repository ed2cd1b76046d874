#!/usr/bin/env python3
"""tests/test_serve.py: `generate --serve` through the real `openai` client and raw sockets.

Run by tests/test_serve.cpp (make test) as
    python3 tests/test_serve.py GENERATE MODEL_BIN
It starts servers on free loopback ports and checks: completions and chat, streamed and not, the
streamed text equal to the whole one and greedy answers equal to `generate --prompt` /
`--interactive` alone; 32 concurrent streaming clients each getting its solo output; /metrics;
every kind of bad input answered with its status in OpenAI's error shape while the server carries
on; the prefix cache (a re-sent conversation's cached tokens in usage and /metrics, the answers
unchanged; --no-prefix-cache); a client that leaves mid-stream (its KV blocks come back); a burst
past --max-queue (503s, every accepted request completes); the API key; SIGTERM finishing what runs
and exiting 0; under mpirun -np 2, concurrent greedy streams equal to the single-process answers.
Every wait is bounded; the whole run is cut at 240 s. Prints one line per check, exits 1 on the first
failure.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

try:
    import openai
except ImportError:
    print("FAIL: the openai client is not installed (python3 -m pip install openai, or bash scripts/setup.sh)")
    sys.exit(1)

GENERATE, MODEL = sys.argv[1], sys.argv[2]
NAME = "stories"
signal.alarm(240)  # nothing here may hang the suite


def check(ok, what):
    if not ok:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


class Server:
    """A `generate --serve` process on a free port; its stderr is kept for the request log lines."""

    def __init__(self, *flags, ranks=0):
        launcher = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)] if ranks else []
        self.proc = subprocess.Popen(launcher + [GENERATE, "--checkpoint", MODEL, "--serve", "--port", "0",
                                                 "--threads", "1", "--model-name", NAME, *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.log = []
        self.port = None
        got_port = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    got_port.set()
            got_port.set()

        threading.Thread(target=read, daemon=True).start()
        got_port.wait(30)
        if self.port is None:
            print("FAIL: the server did not start:\n" + "".join(self.log))
            sys.exit(1)
        deadline = time.time() + 60
        while time.time() < deadline and self.get("/health")[0] != 200:
            time.sleep(0.05)
        check(self.get("/health")[0] == 200, f"server on port {self.port} ready ({' '.join(flags)})")

    def request(self, method, path, body=None, headers=None, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        r = c.getresponse()
        out = r.status, r.read().decode(), dict(r.getheaders())
        c.close()
        return out

    def get(self, path, **kw):
        try:
            return self.request("GET", path, **kw)
        except OSError:
            return 0, "", {}

    def client(self, key="none"):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name):
        text = self.get("/metrics")[1]
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self, sig=signal.SIGINT):
        self.proc.send_signal(sig)
        return self.proc.wait(30)


def error_of(status_body):
    status, body, _ = status_body
    try:
        e = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return status, None
    return status, e if set(e) == {"message", "type", "param", "code"} else None


def solo_generate(prompt, n):
    """`generate --prompt` alone, greedy: the completion after the prompt's text."""
    r = subprocess.run([GENERATE, "--checkpoint", MODEL, "--prompt", prompt, "--temperature", "0",
                        "--max-new-tokens", str(n), "--threads", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def solo_chat(line, n):
    r = subprocess.run([GENERATE, "--checkpoint", MODEL, "--interactive", "--temperature", "0",
                        "--max-new-tokens", str(n), "--threads", "1"], input=line + "\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout


PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy named Tim", "The sun was",
           "Sam and his mom", "There was a big tree", "A bird sang"]

# ---------------------------------------------------------------------------------------------
s = Server("--max-seqs", "8", "--max-queue", "40", "--max-body-bytes", "65536", "--request-timeout", "2")
cl = s.client()

models = cl.models.list()
check([m.id for m in models.data] == [NAME], "GET /v1/models lists the model")

# Completions: whole and streamed, greedy, against generate --prompt alone.
for prompt in PROMPTS[:3]:
    whole = cl.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    text = whole.choices[0].text
    pieces, reasons, usage = [], [], None
    for chunk in cl.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    check("".join(pieces) == text and (len(pieces) > 2 or len(text) < 20), f"completion of {prompt!r}: streamed in {len(pieces)} pieces = whole")
    check(reasons == [whole.choices[0].finish_reason], "one finish_reason, the same streamed and not")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens and
          usage.prompt_tokens == whole.usage.prompt_tokens, "stream_options.include_usage gives the same usage")
    out = solo_generate(prompt, 40)
    check(out.endswith(text + "\n") and out[:len(out) - len(text) - 1].strip() == prompt,
          "greedy completion = generate --prompt alone")

# Chat: whole and streamed, against --interactive alone.
for line in ["Tell me a story about a cat.", "Who is Lily?"]:
    msgs = [{"role": "user", "content": line}]
    whole = cl.chat.completions.create(model=NAME, messages=msgs, max_tokens=50, temperature=0)
    text = whole.choices[0].message.content
    pieces, roles = [], []
    for chunk in cl.chat.completions.create(model=NAME, messages=msgs, max_tokens=50, temperature=0, stream=True):
        d = chunk.choices[0].delta
        if d.role:
            roles.append(d.role)
        if d.content:
            pieces.append(d.content)
    check(whole.choices[0].message.role == "assistant" and roles == ["assistant"], "chat answers as the assistant")
    check("".join(pieces) == text, f"chat {line!r}: streamed = whole ({len(text)} chars)")
    check(solo_chat(line, 50) == text, "greedy chat answer = generate --interactive alone")

# Sampling with a seed is reproducible; stop strings cut the text.
a = cl.completions.create(model=NAME, prompt="Once", max_tokens=30, temperature=1.0, seed=7).choices[0].text
b = cl.completions.create(model=NAME, prompt="Once", max_tokens=30, temperature=1.0, seed=7).choices[0].text
check(a == b, "a seed reproduces a sampled completion")
full = cl.completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0).choices[0].text
stop = full[10:14]
cut = cl.completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop])
streamed = "".join(c.choices[0].text for c in cl.completions.create(
    model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop], stream=True) if c.choices)
check(cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop" and streamed ==
      cut.choices[0].text, f"stop {stop!r} cuts the text, streamed too")

# 32 concurrent streaming clients, greedy: each gets its solo output.
jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 20 + 3 * i) for i in range(32)]
solo = [cl.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0).choices[0].text for p, n in jobs]
before = s.metric("fastgen_generation_tokens_total")
got = [None] * len(jobs)
used = [0] * len(jobs)


def stream_one(i):
    p, n = jobs[i]
    pieces = []
    for ch in s.client().completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
        if ch.choices:
            pieces.append(ch.choices[0].text)
        if ch.usage:
            used[i] = ch.usage.completion_tokens
    got[i] = "".join(pieces)


threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(len(jobs))]
for t in threads:
    t.start()
for t in threads:
    t.join(120)
check(got == solo, "32 concurrent streams each equal their solo output")
metrics = s.get("/metrics")[1]
added = s.metric("fastgen_generation_tokens_total") - before
ttft_count = s.metric("fastgen_time_to_first_token_seconds_count")
check(added == sum(used) > 0, f"/metrics counted the streams' {sum(used)} tokens")
# The gauges follow the scheduler's step, which may end just after the last client has read its [DONE].
deadline = time.time() + 5
while time.time() < deadline and (s.metric("fastgen_requests_running") or s.metric("fastgen_kv_blocks_used")):
    time.sleep(0.05)
check(ttft_count is not None and ttft_count >= 64 and s.metric("fastgen_requests_running") == 0 and
      s.metric("fastgen_kv_blocks_used") == 0, "/metrics: TTFT histogram, nothing running, no blocks held")
check("# TYPE fastgen_time_per_output_token_seconds histogram" in metrics and
      'fastgen_time_to_first_token_seconds_bucket{le="+Inf"}' in metrics, "/metrics is Prometheus text")

# The prefix cache: a chat that re-sends its conversation reuses the earlier turns' blocks, and
# the answers are those of a server without it (below, the --no-prefix-cache server).
CHAT = [{"role": "user", "content": "Once upon a time there was a little girl named Lily who liked to play."}]
hits_before = s.metric("fastgen_prefix_cache_hit_tokens_total")
first = cl.chat.completions.create(model=NAME, messages=CHAT, max_tokens=40, temperature=0)
turn2 = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "What did she do next?"}]
second = cl.chat.completions.create(model=NAME, messages=turn2, max_tokens=20, temperature=0)
again = cl.chat.completions.create(model=NAME, messages=turn2, max_tokens=20, temperature=0)
cached2 = second.usage.prompt_tokens_details.cached_tokens
check(first.usage.prompt_tokens_details.cached_tokens == 0 and 16 <= cached2 < second.usage.prompt_tokens and
      again.usage.prompt_tokens_details.cached_tokens >= cached2 and
      again.choices[0].message.content == second.choices[0].message.content,
      f"usage.prompt_tokens_details.cached_tokens: turn 2 reused {cached2} of {second.usage.prompt_tokens} tokens")
check(s.metric("fastgen_prefix_cache_hit_tokens_total") - hits_before ==
      cached2 + again.usage.prompt_tokens_details.cached_tokens and
      s.metric("fastgen_prefix_cache_queried_tokens_total") >= s.metric("fastgen_prefix_cache_hit_tokens_total") and
      s.metric("fastgen_prefix_cache_blocks") > 0 and s.metric("fastgen_prefix_cache_evictions_total") is not None,
      "/metrics: prefix cache tokens reused and queried, blocks, evictions")

# Bad input: status, OpenAI's error shape, the field named.
BAD = [
    (b"{not json", 400, None, "malformed JSON"),
    ({"model": NAME, "prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens a string"),
    ({"model": NAME, "prompt": 5}, 400, "prompt", "prompt a number"),
    ({"model": NAME, "prompt": ""}, 400, "prompt", "empty prompt"),
    ({"model": NAME, "prompt": "Hi", "max_tokens": -3}, 400, "max_tokens", "negative max_tokens"),
    ({"model": NAME, "prompt": "Hi", "max_tokens": 10 ** 12}, 400, "max_tokens", "huge max_tokens"),
    ({"model": NAME, "prompt": "Hi " * 600}, 400, "prompt", "a prompt past the context"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "model", "unknown model"),
    ({"model": NAME, "prompt": "Hi", "n": 3}, 400, "n", "n = 3"),
    ({"model": NAME, "prompt": "Hi", "frequency_penalty": 0.5}, 400, "frequency_penalty", "a penalty"),
    ({"model": NAME, "prompt": "Hi", "temperature": 9}, 400, "temperature", "temperature 9"),
    ({"model": NAME, "prompt": "Hi", "bogus": 1}, 400, "bogus", "an unknown field"),
]
for body, status, param, what in BAD:
    st, e = error_of(s.request("POST", "/v1/completions", body))
    check(st == status and e is not None and e["param"] == param, f"{what}: {status}, param {param}")
st, e = error_of(s.request("POST", "/v1/completions", {"model": NAME, "prompt": "Hi " * 600}))
check(e["code"] == "context_length_exceeded", "context_length_exceeded code")
st, e = error_of(s.request("POST", "/v1/chat/completions", {"model": NAME}))
check(st == 400 and e["param"] == "messages", "chat without messages: 400, param messages")
st, e = error_of(s.request("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user"}]}))
check(st == 400 and e is not None, "a message without content: 400")
st, e = error_of(s.request("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "assistant",
                                                                                          "content": "Hi"}]}))
check(st == 400 and e["param"] == "messages", "a conversation ending with the assistant: 400")
st, e = error_of(s.request("POST", "/v1/completions", b"x" * 70000))
check(st == 413 and e is not None, "a body over --max-body-bytes: 413")
st, e = error_of(s.request("GET", "/v1/nothing"))
check(st == 404 and e is not None, "an unknown endpoint: 404")
try:
    cl.completions.create(model=NAME, prompt="Hi", max_tokens=-1)
    check(False, "the client sees the 400")
except openai.BadRequestError as err:
    check(err.status_code == 400 and "max_tokens" in str(err), "the openai client raises BadRequestError naming max_tokens")

# A request cut off half-way, and one that stalls: the server carries on, and drops the stalled
# one after --request-timeout.
cut_sock = socket.create_connection(("127.0.0.1", s.port))
cut_sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\": \"On")
cut_sock.close()
stall = socket.create_connection(("127.0.0.1", s.port))
stall.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\"")
t0 = time.time()
ok = cl.completions.create(model=NAME, prompt="Once", max_tokens=5, temperature=0)
check(ok.choices[0].text != "" and time.time() - t0 < 1.5, "a cut-off and a stalled request do not hold up others")
stall.settimeout(10)
try:
    closed = stall.recv(1024) is not None  # b"" (closed) or an error response, after the timeout
except socket.timeout:
    closed = False
check(closed and time.time() - t0 < 8, f"the stalled request is dropped after --request-timeout ({time.time() - t0:.1f} s)")
stall.close()

# A client that leaves mid-stream: its request is cancelled and its blocks come back.
c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
c.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "Once upon a time", "max_tokens": 400,
                                                  "temperature": 0, "stream": True, "ignore_eos": True}),
          {"Content-Type": "application/json"})
r = c.getresponse()
r.readline()  # the first event
c.sock.shutdown(socket.SHUT_RDWR)
c.close()
deadline = time.time() + 20
while time.time() < deadline and not (s.metric('fastgen_requests_total{finish_reason="cancelled"}') == 1 and
                                      s.metric("fastgen_kv_blocks_used") == 0):
    time.sleep(0.05)
check(s.metric('fastgen_requests_total{finish_reason="cancelled"}') == 1 and s.metric("fastgen_kv_blocks_used") == 0,
      "a client gone mid-stream: its request cancelled, its KV blocks free")
check(cl.completions.create(model=NAME, prompt="Once upon a time", max_tokens=40, temperature=0).choices[0].text ==
      full, "and the next request still gets its answer")
# Many clients connecting at the same instant are all accepted (httplib's own listen backlog is 5).
barrier = threading.Barrier(64)
health = [0] * 64


def connect_at_once(i):
    barrier.wait(10)
    health[i] = s.get("/health", timeout=20)[0]


threads = [threading.Thread(target=connect_at_once, args=(i,)) for i in range(64)]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
check(health == [200] * 64, f"64 clients connecting at once all answered ({health.count(200)} of 64)")
if shutil.which("ss"):
    listen = subprocess.run(["ss", "-ltnH", f"sport = :{s.port}"], capture_output=True, text=True).stdout.split()
    check(len(listen) >= 3 and int(listen[2]) >= 128, f"the listen backlog is at least 128 ({listen[2:3]})")

check(s.stop(signal.SIGINT) == 0, "SIGINT with nothing running: exit 0")

# A burst past --max-queue: 503 with Retry-After for the excess; every accepted request completes.
s = Server("--max-seqs", "2", "--max-queue", "2")
results = []


def burst_one():
    try:
        st, body, headers = s.request("POST", "/v1/completions", {"model": NAME, "prompt": "Once", "max_tokens": 60,
                                                                  "temperature": 0, "ignore_eos": True}, timeout=60)
    except OSError as err:
        st, body, headers = -1, str(err), {}
    results.append((st, body, headers))


threads = [threading.Thread(target=burst_one) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join(90)
accepted = [json.loads(b) for st, b, _ in results if st == 200]
refused = [(b, h) for st, b, h in results if st == 503]
check(len(accepted) + len(refused) == 16 and refused and accepted, f"burst of 16: {len(accepted)} accepted, "
      f"{len(refused)} refused, nothing else")
check(all(a["usage"]["completion_tokens"] == 60 for a in accepted), "every accepted request completes")
check(all(h.get("Retry-After") and json.loads(b)["error"]["code"] == "queue_full" for b, h in refused),
      "each 503 says queue_full with Retry-After")

# SIGTERM while a request streams: it finishes, then the server exits 0.
c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
c.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "Once", "max_tokens": 300, "temperature": 0,
                                                  "stream": True, "ignore_eos": True}),
          {"Content-Type": "application/json"})
r = c.getresponse()
r.readline()
s.proc.send_signal(signal.SIGTERM)
body = r.read().decode()
check(body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body,
      "SIGTERM: the running stream finishes")
check(s.proc.wait(30) == 0, "and the server exits 0")
check(any(re.match(r"request cmpl-\d+: 200 length, prompt \d+ tokens, completion 60, TTFT [\d.]+ ms, TPOT", l)
          for l in s.log), "one log line per request")

# Under mpirun: rank 0 serves, both ranks step together (each holds half the heads); greedy answers,
# streamed and concurrent, equal the single-process ones.
if shutil.which("mpirun"):
    s = Server(ranks=2)
    tp_got = [None] * 4

    def tp_one(i):
        tp_got[i] = "".join(c.choices[0].text for c in s.client().completions.create(
            model=NAME, prompt=jobs[i][0], max_tokens=jobs[i][1], temperature=0, stream=True) if c.choices)

    threads = [threading.Thread(target=tp_one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    check(tp_got == solo[:4], "mpirun -np 2: 4 concurrent streams = the single-process answers")
    s.proc.send_signal(signal.SIGTERM)  # mpirun passes it on to the ranks, then ends them
    check(s.proc.wait(30) is not None, "mpirun -np 2: the server ends on SIGTERM")
else:
    print("skipped: mpirun not found (the tensor-parallel server)")

# The API key: every endpoint but /health needs it. (This server runs without the prefix cache.)
s = Server("--api-key", "sesame", "--no-prefix-cache")
st, e = error_of(s.request("POST", "/v1/completions", {"model": NAME, "prompt": "Hi"}))
check(st == 401 and e["code"] == "invalid_api_key", "no key: 401")
st, e = error_of(s.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"}))
check(st == 401, "a wrong key: 401")
check(s.get("/health")[0] == 200 and s.get("/metrics")[0] == 401, "/health open, /metrics closed")
try:
    s.client("wrong").models.list()
    check(False, "the client sees the 401")
except openai.AuthenticationError:
    check(True, "the openai client raises AuthenticationError")
check(s.client("sesame").completions.create(model=NAME, prompt="Once", max_tokens=3).usage.completion_tokens == 3,
      "the right key works")
plain = s.client("sesame")
second_plain = plain.chat.completions.create(model=NAME, messages=turn2, max_tokens=20, temperature=0)
check(second_plain.choices[0].message.content == second.choices[0].message.content and
      plain.chat.completions.create(model=NAME, messages=turn2, max_tokens=20,
                                    temperature=0).usage.prompt_tokens_details.cached_tokens == 0,
      "--no-prefix-cache: the same answer, nothing reused")
check(s.stop(signal.SIGTERM) == 0, "SIGTERM: exit 0")
print("all server checks passed")
