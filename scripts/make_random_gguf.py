#!/usr/bin/python3
"""make_random_gguf.py: a random-weight Llama model as a llama.cpp GGUF (v3), for side-by-side benchmarks.

The shapes of scripts/make_random_model.py (default: the 110M shape), weights N(0, --std) in F16 or
F32, norms 1, and the vocabulary of a sentencepiece tokenizer.model as GGUF's `llama` tokenizer
(pieces, scores, token types), so llama.cpp and fastgen (`quantize --from FILE.gguf`) run the very
same file. Decode and prefill speed depend on the shapes, not the values. Written to a temporary
name and renamed.

Usage: /usr/bin/python3 scripts/make_random_gguf.py --out FILE.gguf [--dim 768 --layers 12 --heads 12
       --kv-heads 12 --hidden 2048 --seq-len 1024 --dtype F16 --tokenizer ../shared/models/tokenizer.model]
"""
import argparse
import os
import struct

import numpy as np
import sentencepiece as spm

GGUF_MAGIC = b"GGUF"
ALIGN = 32
# GGUF metadata value types and ggml tensor types.
T_UINT32, T_INT32, T_FLOAT32, T_STRING, T_ARRAY = 4, 5, 6, 8, 9
GGML = {"F32": (0, np.float32), "F16": (1, np.float16)}


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gguf_string(key) + struct.pack("<I", vtype)
    if vtype == T_UINT32:
        return out + struct.pack("<I", value)
    if vtype == T_FLOAT32:
        return out + struct.pack("<f", value)
    if vtype == T_STRING:
        return out + gguf_string(value)
    raise ValueError(vtype)


def kv_array(key, etype, values):
    out = gguf_string(key) + struct.pack("<IIQ", T_ARRAY, etype, len(values))
    if etype == T_STRING:
        return out + b"".join(gguf_string(v) for v in values)
    fmt = {T_INT32: "<i", T_FLOAT32: "<f"}[etype]
    return out + b"".join(struct.pack(fmt, v) for v in values)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split(":", 1)[1].strip().split("\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=sorted(GGML), default="F16")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "../../shared/models/tokenizer.model"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    kvh = a.kv_heads or a.heads
    head_dim = a.dim // a.heads

    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    vocab = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(vocab)]
    scores = [sp.get_score(i) for i in range(vocab)]
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte.
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
             for i in range(vocab)]

    rng = np.random.default_rng(a.seed)
    ggml_type, np_type = GGML[a.dtype]

    def matrix(rows, cols):  # a [rows, cols] weight: GGUF lists its dims innermost first, (cols, rows)
        return rng.normal(0, a.std, size=(rows, cols)).astype(np_type)

    tensors = [("token_embd.weight", matrix(vocab, a.dim))]
    for layer in range(a.layers):
        p = f"blk.{layer}."
        tensors += [(p + "attn_norm.weight", np.ones(a.dim, np.float32)),
                    (p + "attn_q.weight", matrix(a.heads * head_dim, a.dim)),
                    (p + "attn_k.weight", matrix(kvh * head_dim, a.dim)),
                    (p + "attn_v.weight", matrix(kvh * head_dim, a.dim)),
                    (p + "attn_output.weight", matrix(a.dim, a.heads * head_dim)),
                    (p + "ffn_norm.weight", np.ones(a.dim, np.float32)),
                    (p + "ffn_gate.weight", matrix(a.hidden, a.dim)),
                    (p + "ffn_up.weight", matrix(a.hidden, a.dim)),
                    (p + "ffn_down.weight", matrix(a.dim, a.hidden))]
    tensors += [("output_norm.weight", np.ones(a.dim, np.float32)), ("output.weight", matrix(vocab, a.dim))]

    meta = [kv("general.architecture", T_STRING, "llama"),
            kv("general.name", T_STRING, f"random-{a.dim}x{a.layers}"),
            kv("general.file_type", T_UINT32, 0 if a.dtype == "F32" else 1),
            kv("general.alignment", T_UINT32, ALIGN),
            kv("llama.context_length", T_UINT32, a.seq_len),
            kv("llama.embedding_length", T_UINT32, a.dim),
            kv("llama.block_count", T_UINT32, a.layers),
            kv("llama.feed_forward_length", T_UINT32, a.hidden),
            kv("llama.rope.dimension_count", T_UINT32, head_dim),
            kv("llama.attention.head_count", T_UINT32, a.heads),
            kv("llama.attention.head_count_kv", T_UINT32, kvh),
            kv("llama.attention.layer_norm_rms_epsilon", T_FLOAT32, 1e-5),
            kv("llama.rope.freq_base", T_FLOAT32, 10000.0),
            kv("llama.vocab_size", T_UINT32, vocab),
            kv("tokenizer.ggml.model", T_STRING, "llama"),
            kv_array("tokenizer.ggml.tokens", T_STRING, pieces),
            kv_array("tokenizer.ggml.scores", T_FLOAT32, scores),
            kv_array("tokenizer.ggml.token_type", T_INT32, types),
            kv("tokenizer.ggml.bos_token_id", T_UINT32, sp.bos_id()),
            kv("tokenizer.ggml.eos_token_id", T_UINT32, sp.eos_id()),
            kv("tokenizer.ggml.unknown_token_id", T_UINT32, sp.unk_id())]

    infos, offset = [], 0
    for name, t in tensors:
        dims = list(reversed(t.shape))
        typ = 0 if t.dtype == np.float32 else ggml_type
        infos.append(gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
                     struct.pack("<IQ", typ, offset))
        offset += (t.nbytes + ALIGN - 1) // ALIGN * ALIGN

    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(meta)))
        for m in meta:
            f.write(m)
        for i in infos:
            f.write(i)
        f.write(b"\0" * (-f.tell() % ALIGN))
        for _, t in tensors:
            f.write(t.tobytes())
            f.write(b"\0" * (-t.nbytes % ALIGN))
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {len(tensors)} tensors, {os.path.getsize(a.out) / 1e6:.1f} MB, vocab {vocab}")


if __name__ == "__main__":
    main()
