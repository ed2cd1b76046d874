#!/usr/bin/python3
"""fuzz_seeds.py: writes the libFuzzer seed corpus, tests/data/fuzz/NAME/ for each harness
tests/fuzz/fuzz_NAME.cpp: small valid and near-valid inputs (a few KB each), and tok.model, the
sentencepiece tokenizer the harnesses share (trained here on tests/data/tinystory.txt: 64 pieces, no normalizer table).

Checkpoints are one tiny Llama (dim 32, 1 layer, 2 heads, 1 KV head, hidden 32:
GGUF blocks and int4 groups are 32 wide) in each format the
converter reads; the converter harnesses' inputs start with two option bytes (fuzz_util.h:
fuzz_convert_options; mode = byte 0 % 6 of auto f32 bf16 f16 int8 int4). model.bin seeds come
from ./quantize (built first: make quantize). Deterministic: the same files on every run.

Usage: /usr/bin/python3 scripts/fuzz_seeds.py [--quantize ./quantize]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import sentencepiece as spm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "tests/data")
OUT = os.path.join(DATA, "fuzz")
DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, SEQ = 32, 32, 1, 2, 1, 16
HEAD_DIM = DIM // HEADS
MODES = {"auto": 0, "f32": 1, "bf16": 2, "f16": 3, "int8": 4, "int4": 5}


def put(name, fname, data):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, fname), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def options(mode, group_bits=0):
    return bytes([MODES[mode], group_bits])


def train_tokenizer():
    path = os.path.join(OUT, "tok.model")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory() as tmp:
            spm.SentencePieceTrainer.train(input=os.path.join(DATA, "tinystory.txt"), model_prefix=tmp + "/tok",
                                           vocab_size=64, model_type="bpe", character_coverage=1.0,
                                           normalization_rule_name="identity", hard_vocab_limit=False,
                                           num_threads=1, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
            shutil.copy(tmp + "/tok.model", path)
    return spm.SentencePieceProcessor(model_file=path)


def weights(vocab, rng):
    """Meta-layout (llama2.c) names -> f32 arrays."""
    def m(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    w = {"tok_embeddings.weight": m(vocab, DIM), "norm.weight": np.ones(DIM, np.float32),
         "output.weight": m(vocab, DIM)}
    for l in range(LAYERS):
        p = f"layers.{l}."
        w.update({p + "attention_norm.weight": np.ones(DIM, np.float32), p + "ffn_norm.weight": np.ones(DIM, np.float32),
                  p + "attention.wq.weight": m(HEADS * HEAD_DIM, DIM), p + "attention.wk.weight": m(KV_HEADS * HEAD_DIM, DIM),
                  p + "attention.wv.weight": m(KV_HEADS * HEAD_DIM, DIM), p + "attention.wo.weight": m(DIM, HEADS * HEAD_DIM),
                  p + "feed_forward.w1.weight": m(HIDDEN, DIM), p + "feed_forward.w2.weight": m(DIM, HIDDEN),
                  p + "feed_forward.w3.weight": m(HIDDEN, DIM)})
    return w


LAYER_ORDER = ["attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
               "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
               "feed_forward.w3.weight"]


def llama2c(w, vocab, version=0, tie=False):
    layers = lambda what: b"".join(w[f"layers.{l}.{what}"].tobytes() for l in range(LAYERS))
    if version == 0:
        b = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, vocab if tie else -vocab, SEQ)
        b += w["tok_embeddings.weight"].tobytes() + b"".join(layers(x) for x in LAYER_ORDER) + w["norm.weight"].tobytes()
        b += np.full(SEQ * HEAD_DIM, 0.25, np.float32).tobytes()  # the RoPE tables (real, imaginary), ignored
    else:
        b = struct.pack("<9i", 0x616b3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, vocab, SEQ) + bytes([tie])
        b = b.ljust(256, b"\0") + layers("attention_norm.weight") + layers("ffn_norm.weight") + w["norm.weight"].tobytes()
        b += w["tok_embeddings.weight"].tobytes() + b"".join(layers(x) for x in LAYER_ORDER if "norm" not in x)
    if not tie:
        b += w["output.weight"].tobytes()
    return b


def safetensors(tensors, metadata=None):
    """name -> array (f32, f16, or uint16 as BF16), packed in order, each at its element alignment."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16"}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
        blobs.append(t.tobytes())
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def rotate_half(t, heads):
    """Meta -> HF row order of q/k (HF's convert_llama_weights_to_hf.py permute)."""
    rows, cols = t.shape
    return t.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_tensors(w, dtype=np.float32):
    t = {"model.embed_tokens.weight": w["tok_embeddings.weight"], "model.norm.weight": w["norm.weight"],
         "lm_head.weight": w["output.weight"]}
    names = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight"}
    for l in range(LAYERS):
        for ours, theirs in names.items():
            x = w[f"layers.{l}.{ours}"]
            if ours == "attention.wq.weight":
                x = rotate_half(x, HEADS)
            elif ours == "attention.wk.weight":
                x = rotate_half(x, KV_HEADS)
            t[f"model.layers.{l}.{theirs}"] = x
    return {k: v.astype(dtype) for k, v in t.items()}


def hf_config(vocab, **patch):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": DIM,
         "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "num_key_value_heads": KV_HEADS, "vocab_size": vocab, "max_position_embeddings": SEQ, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
         "torch_dtype": "float32"}
    c.update(patch)
    return json.dumps(c, indent=1)


def hf_folder(files):
    """fuzz_hf's input: '@@FILE name' lines, each followed by the file's bytes."""
    b = b""
    for name, data in files:
        b += b"@@FILE " + name.encode() + b"\n" + (data if isinstance(data, bytes) else data.encode()) + b"\n"
    return b


# GGUF ---------------------------------------------------------------------------------------------
def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, value):
    k = gguf_str(key)
    if isinstance(value, str):
        return k + struct.pack("<I", 8) + gguf_str(value)
    if isinstance(value, float):
        return k + struct.pack("<If", 6, value)
    if isinstance(value, int):
        return k + struct.pack("<II", 4, value)
    etype, items = value  # an array: (element type, values)
    out = k + struct.pack("<IIQ", 9, etype, len(items))
    if etype == 8:
        return out + b"".join(gguf_str(v) for v in items)
    return out + b"".join(struct.pack("<f" if etype == 6 else "<i", v) for v in items)


def q8_0(x):
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(1) / 127
    q = np.round(blocks / np.where(d == 0, 1, d)[:, None]).astype(np.int8)
    return b"".join(struct.pack("<e", s) + r.tobytes() for s, r in zip(d, q))


def q4_0(x):
    out = b""
    for b in x.reshape(-1, 32):
        m = b[np.argmax(np.abs(b))]
        d = m / -8
        q = np.clip(np.round(b / (d if d else 1)) + 8, 0, 15).astype(np.uint8)
        out += struct.pack("<e", d) + (q[:16] | (q[16:] << 4)).tobytes()
    return out


GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8}


def gguf(w, pieces, matrix_type="F32", embed_type=None, vocab=None):
    """A llama GGUF (v3) of w, matrices in matrix_type, with the pieces as its sentencepiece vocabulary."""
    vocab = vocab or len(pieces)
    t = [("token_embd.weight", w["tok_embeddings.weight"][:vocab], embed_type or matrix_type),
         ("output_norm.weight", w["norm.weight"], "F32"), ("output.weight", w["output.weight"][:vocab], matrix_type)]
    names = {"attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm", "attention.wq.weight": "attn_q",
             "attention.wk.weight": "attn_k", "attention.wv.weight": "attn_v", "attention.wo.weight": "attn_output",
             "feed_forward.w1.weight": "ffn_gate", "feed_forward.w2.weight": "ffn_down", "feed_forward.w3.weight": "ffn_up"}
    for l in range(LAYERS):
        for ours, theirs in names.items():
            x = w[f"layers.{l}.{ours}"]
            t.append((f"blk.{l}.{theirs}.weight", x, "F32" if x.ndim == 1 else matrix_type))
    types = [2 if p == "<unk>" else 3 if p in ("<s>", "</s>") else 1 for p in pieces[:vocab]]
    meta = [("general.architecture", "llama"), ("general.alignment", 32), ("llama.context_length", SEQ),
            ("llama.embedding_length", DIM), ("llama.block_count", LAYERS), ("llama.feed_forward_length", HIDDEN),
            ("llama.rope.dimension_count", HEAD_DIM), ("llama.attention.head_count", HEADS),
            ("llama.attention.head_count_kv", KV_HEADS), ("llama.attention.layer_norm_rms_epsilon", 1e-5),
            ("llama.rope.freq_base", 10000.0), ("tokenizer.ggml.model", "llama"),
            ("tokenizer.ggml.tokens", (8, pieces[:vocab])), ("tokenizer.ggml.scores", (6, [-float(i) for i in range(vocab)])),
            ("tokenizer.ggml.token_type", (5, types)), ("tokenizer.ggml.bos_token_id", 1),
            ("tokenizer.ggml.eos_token_id", 2), ("tokenizer.ggml.unknown_token_id", 0)]
    infos, blobs, offset = b"", [], 0
    for name, x, typ in t:
        data = {"F32": lambda a: a.astype(np.float32).tobytes(), "F16": lambda a: a.astype(np.float16).tobytes(),
                "Q8_0": q8_0, "Q4_0": q4_0}[typ](x)
        dims = list(reversed(x.shape))
        infos += gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", GGML_TYPE[typ], offset)
        data += b"\0" * (-len(data) % 32)
        blobs.append(data)
        offset += len(data)
    b = b"GGUF" + struct.pack("<IQQ", 3, len(t), len(meta)) + b"".join(gguf_kv(k, v) for k, v in meta) + infos
    return b + b"\0" * (-len(b) % 32) + b"".join(blobs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split(":", 1)[1].strip().split("\n")[0])
    ap.add_argument("--quantize", default=os.path.join(ROOT, "quantize"))
    a = ap.parse_args()
    for d in os.listdir(OUT) if os.path.isdir(OUT) else []:
        if os.path.isdir(os.path.join(OUT, d)):
            shutil.rmtree(os.path.join(OUT, d))
    os.makedirs(OUT, exist_ok=True)
    sp = train_tokenizer()
    vocab = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(vocab)]
    rng = np.random.default_rng(0)
    w = weights(vocab, rng)

    # llama2.c checkpoints: legacy and version 1, tied and not, each mode; one NaN weight (finding 1:
    # int8/int4 must refuse it, naming the tensor); a truncated file.
    ck = llama2c(w, vocab)
    for mode in ("f32", "int8", "int4"):  # libFuzzer mutates the option bytes into the other modes
        put("llama2c", f"legacy-{mode}", options(mode) + ck)
    put("llama2c", "v1-tied-int4-g64", options("int4", 1) + llama2c(w, vocab, version=1, tie=True))
    put("llama2c", "truncated", options("f32") + ck[: len(ck) // 2])
    bad = {k: v.copy() for k, v in w.items()}
    bad["layers.0.attention.wq.weight"][3, 5] = np.nan
    put("llama2c", "regression-nan-int8", options("int8") + llama2c(bad, vocab))
    bad["layers.0.attention.wq.weight"][3, 5] = np.inf
    put("llama2c", "regression-inf-int4", options("int4") + llama2c(bad, vocab))

    # Hugging Face folders: safetensors + tokenizer.model, bf16 in two shards with an index, and
    # tokenizer.json with a chat template.
    tok_model = open(os.path.join(OUT, "tok.model"), "rb").read()
    st = safetensors(hf_tensors(w))
    put("hf", "f32-int8", options("int8") + hf_folder([("config.json", hf_config(vocab)), ("model.safetensors", st),
                                                       ("tokenizer.model", tok_model)]))
    t = hf_tensors(w)
    bf16 = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in t.items()}
    names = list(bf16)
    half = len(names) // 2
    shards = [{k: bf16[k] for k in names[:half]}, {k: bf16[k] for k in names[half:]}]
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    put("hf", "bf16-shards-int4", options("int4") + hf_folder(
        [("config.json", hf_config(vocab, torch_dtype="bfloat16")), ("model.safetensors.index.json", json.dumps(index)),
         ("model-00001-of-00002.safetensors", safetensors(shards[0])),
         ("model-00002-of-00002.safetensors", safetensors(shards[1])), ("tokenizer.model", tok_model)]))
    bpe = json.load(open(os.path.join(DATA, "bpe_tiny.json")))  # cut to its first 280 ids: the bytes, a few merges
    bpe_vocab = 280
    bpe["model"]["vocab"] = {k: i for k, i in bpe["model"]["vocab"].items() if i < bpe_vocab}
    bpe["model"]["merges"] = [m for m in bpe["model"]["merges"] if "".join(m) in bpe["model"]["vocab"]]
    wb = weights(bpe_vocab, np.random.default_rng(1))
    put("hf", "tokenizer-json-tied-f16", options("f16") + hf_folder(
        [("config.json", hf_config(bpe_vocab, tie_word_embeddings=True)),
         ("model.safetensors", safetensors({k: v for k, v in hf_tensors(wb, np.float16).items()
                                            if k != "lm_head.weight"})),
         ("tokenizer.json", json.dumps(bpe)),
         ("tokenizer_config.json", json.dumps({"chat_template": "{{ '<|im_start|>' + message['content'] }}"}))]))
    nan = hf_tensors(w)
    nan["model.layers.0.mlp.up_proj.weight"][1, 2] = np.nan
    put("hf", "regression-nan-int4", options("int4") + hf_folder(
        [("config.json", hf_config(vocab)), ("model.safetensors", safetensors(nan)), ("tokenizer.model", tok_model)]))

    # GGUF: F32, F16, Q8_0, Q4_0; and finding 2: a Q4_0 embedding of 10 rows (its zero points an odd
    # number of bytes), converted with the embeddings quantized, then loaded.
    for typ in ("F32", "F16", "Q8_0", "Q4_0"):
        put("gguf", f"{typ.lower()}", options("auto") + gguf(w, pieces, typ))
    put("gguf", "regression-q4_0-vocab10", options("auto", 8) + gguf(w, pieces, "Q4_0", vocab=10))
    put("gguf", "f16-int4-vocab10", options("int4", 8) + gguf(w, pieces, "F16", vocab=10))

    # model.bin: what ./quantize writes from the llama2.c seed, in f32, int8 and int4.
    if os.access(a.quantize, os.X_OK):
        with tempfile.TemporaryDirectory() as tmp:
            open(tmp + "/m.ckpt", "wb").write(ck)
            for mode in ("f32", "bf16", "int8", "int4"):
                subprocess.run([a.quantize, "-q", "-i", tmp + "/m.ckpt", "-t", os.path.join(OUT, "tok.model"),
                                "-m", mode, "-o", tmp + "/m.bin"], check=True, stdout=subprocess.DEVNULL)
                put("model_bin", mode, open(tmp + "/m.bin", "rb").read())
    else:
        print(f"fuzz_seeds: {a.quantize} not built: no model_bin seeds (make quantize first)")

    # Tokenizers as model.bin embeds them.
    put("tokenizer", "sentencepiece", tok_model)
    put("tokenizer", "tokenizer-json", json.dumps(bpe))
    put("tokenizer", "tiktoken", open(os.path.join(DATA, "bpe_tiktoken.model"), "rb").read())

    # BPE and decode: byte 0 picks the tokenizer (fuzz_bpe.cpp), 0x80 matches special tokens.
    texts = ["Once upon a time, there was a little girl.", "  x = 42;\n\tdef f(): return 3.14159",
             "caf\u00e9 \u20ac \U0001F600 \u4e2d\u6587", "<|im_start|>user\nhi<|im_end|>", "\xff\xfe broken"]
    for which in range(5):
        for i, text in enumerate(texts):
            special = 0x80 if "<|" in text else 0
            raw = text.encode("utf-8") if i != 4 else b"\xff\xfe broken \xc3"
            put("bpe", f"tok{which}-{i}", bytes([which | special]) + raw)

    # JSONL request lines.
    lines = ['{"prompt": "Once upon a time"}',
             '{"id": "a", "prompt": "Hi", "max_new_tokens": 3, "temperature": 0, "top_k": 0, "top_p": 0.5, '
             '"seed": 7, "stop": ["\\n", "."], "ignore_eos": true}',
             '{"id": 12, "prompt": "caf\\u00e9", "stop": "x"}', '{"prompt": ""}', '[1, 2]',
             '{"prompt": "a", "top_p": 1e-300}', '{"prompt": "' + "long " * 80 + '"}']
    for i, line in enumerate(lines):
        put("request", f"line-{i}", line)

    # Server bodies: byte 0 bit 0 = chat.
    bodies = [(0, {"model": "fuzz", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
              (0, {"prompt": ["Hi"], "stream": True, "stream_options": {"include_usage": True}, "seed": 3,
                   "stop": ["\n"], "top_p": 0.9, "top_k": 40}),
              (0, {"prompt": [1, 2, 3], "n": 1, "logprobs": None, "echo": False}),
              (1, {"model": "fuzz", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello"}], "max_completion_tokens": 5}),
              (1, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}],
                   "stream": True, "response_format": {"type": "text"}, "tools": []}),
              (1, {"messages": [], "max_tokens": -1}), (0, {"prompt": "x", "max_tokens": 10 ** 20})]
    for i, (chat, body) in enumerate(bodies):
        put("serve", f"body-{i}", bytes([chat]) + json.dumps(body).encode())
    put("serve", "truncated", b"\x01" + b'{"messages": [{"role": "user", "content": "He')

    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"fuzz_seeds: wrote {OUT} ({total / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
