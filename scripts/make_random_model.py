#!/usr/bin/python3
"""make_random_model.py: write a random-weight Llama model.bin (for benchmarks and tests), one tensor at a time."""

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelbin  # noqa: E402

CHUNK = 1 << 24  # elements generated at a time (64 MiB of float32)


def random_chunks(rng, shape, std):
    """Yield N(0, std) float32 values for a tensor of this shape, CHUNK elements at a time."""
    n = math.prod(shape)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = rng.standard_normal(m, dtype=np.float32)
        x *= np.float32(std)
        yield x


def pooled_chunks(rng, pool, shape, std):
    """Like random_chunks, but cycling through a few pre-drawn chunks (--fast): multi-GB benchmark
    models in seconds rather than minutes, values still random-looking (never zeros)."""
    n = math.prod(shape)
    k = int(rng.integers(len(pool)))
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        yield pool[k % len(pool)][:m] * np.float32(std)
        k += 1


def ones_chunks(shape):
    yield np.ones(math.prod(shape), dtype=np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=None, help="default: dim / heads")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=0,
                    help="Mixtral-style MoE: experts per layer, each of width --hidden (0: dense)")
    ap.add_argument("--experts-per-tok", type=int, default=2, help="with --experts: experts each token uses")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", choices=modelbin.FLOAT_DTYPES, default="BF16")
    ap.add_argument("--tie", action="store_true", help="share the classifier with the embedding")
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--std", type=float, default=0.02, help="weight standard deviation")
    ap.add_argument("--tokenizer", default="/work/shared/models/tokenizer.model",
                    help="sentencepiece model to embed ('' for none)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--fast", action="store_true",
                    help="reuse a few random chunks across tensors (large benchmark models in seconds)")
    a = ap.parse_args()

    kv_heads = a.kv_heads or a.heads
    if a.head_dim is None and a.dim % a.heads:
        sys.exit("--dim %d is not a multiple of --heads %d; give --head-dim" % (a.dim, a.heads))
    head_dim = a.head_dim or a.dim // a.heads

    tok_bytes, bos, eos = None, 1, 2
    if a.tokenizer:
        with open(a.tokenizer, "rb") as f:
            tok_bytes = f.read()
        try:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(tok_bytes)
            if sp.bos_id() >= 0:
                bos = sp.bos_id()
            if sp.eos_id() >= 0:
                eos = sp.eos_id()
            if sp.GetPieceSize() != a.vocab:
                print("warning: tokenizer has %d pieces, --vocab is %d" % (sp.GetPieceSize(), a.vocab),
                      file=sys.stderr)
        except ImportError:
            pass

    moe = {"n_experts": a.experts, "n_experts_per_tok": a.experts_per_tok} if a.experts else {}
    if a.experts and not 1 <= a.experts_per_tok <= a.experts:
        sys.exit("--experts-per-tok %d must be between 1 and --experts %d" % (a.experts_per_tok, a.experts))
    config = modelbin.normalize_config({
        "dim": a.dim, "hidden_dim": a.hidden, "n_layers": a.layers, "n_heads": a.heads,
        "n_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": a.vocab,
        "max_seq_len": a.seq_len, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "tie_embeddings": a.tie, "bos_id": bos, "eos_id": eos, **moe,
    })

    rng = np.random.default_rng(a.seed)
    pool = [rng.standard_normal(CHUNK, dtype=np.float32) for _ in range(4)] if a.fast else []
    # Residual-branch outputs (wo, w2) scaled down GPT-2 style so the residual stream stays O(1).
    out_std = a.std / math.sqrt(2 * a.layers)
    entries = []
    n_params = 0
    for name, shape in modelbin.expected_shapes(config).items():
        n_params += math.prod(shape)
        if name.endswith("norm.weight"):
            produce = (lambda shape=shape: ones_chunks(shape))
        else:
            std = out_std if name.endswith(("wo.weight", "w2.weight")) else a.std
            if a.fast:
                produce = (lambda shape=shape, std=std: pooled_chunks(rng, pool, shape, std))
            else:
                produce = (lambda shape=shape, std=std: random_chunks(rng, shape, std))
        entries.append((name, a.dtype, shape, produce))

    t0 = time.time()
    modelbin.write_model_streaming(a.out, config, entries, tokenizer_bytes=tok_bytes)
    if not a.quiet:
        print("wrote %s: %.1fM parameters, %s, %.2f GB in %.1fs"
              % (a.out, n_params / 1e6, a.dtype, os.path.getsize(a.out) / 1e9, time.time() - t0))


if __name__ == "__main__":
    main()
