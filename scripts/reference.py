#!/usr/bin/python3
"""reference.py: plain PyTorch (float64) Llama forward over a model.bin, the oracle for fastgen's logits."""
# Usage:
#   reference.py MODEL --tokens 1,5,9 [--out FILE]   logits for every position as little-endian
#                                                    float32 [n_tokens][vocab] to FILE, or the
#                                                    argmax per position (comma-separated) to stdout
#   reference.py MODEL --tokens 1,5,9 --greedy N     generate N tokens greedily; print their ids
#   --prompt TEXT instead of --tokens encodes TEXT with the embedded tokenizer (BOS first).
#   --int16-activations: the input of every int8/int4 matrix rounded to 15-bit integers per
#                       32-column block, as fastgen's CPU kernels multiply (its tests use this).
#
# The model is written like Meta's llama model.py: RMSNorm, RoPE on adjacent pairs (complex
# multiply), GQA by repeating each kv head n_heads/n_kv_heads times, causal softmax attention,
# SwiGLU feed-forward, or (Mixtral, config n_experts > 0) a sparse mixture of SwiGLU experts written
# like HF's MixtralSparseMoeBlock. No KV cache: every step runs the whole sequence again.


import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelbin  # noqa: E402

DTYPE = torch.float64


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPE, device=device))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def llama3_scaled(freqs, s):
    """Llama 3.1 RoPE scaling, written from the HF rope_type "llama3" rule over whole tensors
    (model.cpp loops over pairs): stretch long wavelengths by s["factor"], keep short ones, blend."""
    wavelen = 2 * math.pi / freqs
    old = s["original_max_seq_len"]
    low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old / low, freqs / factor, freqs)
    middle = (wavelen <= old / low) & (wavelen >= old / high)
    return torch.where(middle, blended, out)


def precompute_freqs_cis(head_dim, n_pos, theta, scaling=None):
    """cos + i sin of pos * theta^(-2i/head_dim) (Llama 3.1-scaled when `scaling`), shape
    [n_pos, head_dim/2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=DTYPE) / head_dim))
    if scaling:
        freqs = llama3_scaled(freqs, scaling)
    t = torch.arange(n_pos, dtype=DTYPE)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x, freqs_cis):
    """x [batch, seq, heads, head_dim]: rotate each adjacent pair (2i, 2i+1) as a complex number."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    xc = xc * freqs_cis[None, :, None, :]
    return torch.view_as_real(xc).flatten(3)


def repeat_kv(x, n_rep):
    """[batch, seq, n_kv_heads, head_dim] -> [batch, seq, n_kv_heads*n_rep, head_dim]; kv head j
    serves query heads j*n_rep .. j*n_rep+n_rep-1."""
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=2)


class Attention(nn.Module):
    def __init__(self, c, device=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        self.n_rep = self.n_heads // self.n_kv_heads
        kw = dict(bias=False, dtype=DTYPE, device=device)
        self.wq = nn.Linear(c["dim"], self.n_heads * self.head_dim, **kw)
        self.wk = nn.Linear(c["dim"], self.n_kv_heads * self.head_dim, **kw)
        self.wv = nn.Linear(c["dim"], self.n_kv_heads * self.head_dim, **kw)
        self.wo = nn.Linear(self.n_heads * self.head_dim, c["dim"], **kw)

    def forward(self, x, freqs_cis, mask):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        k = repeat_kv(k, self.n_rep)
        v = repeat_kv(v, self.n_rep)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [bsz, heads, seq, head_dim]
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores + mask
        probs = F.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=DTYPE, device=device)
        self.w1 = nn.Linear(dim, hidden_dim, **kw)
        self.w2 = nn.Linear(hidden_dim, dim, **kw)
        self.w3 = nn.Linear(dim, hidden_dim, **kw)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    """HF MixtralSparseMoeBlock: router softmax over all experts, top-k, weights renormalised over
    the k, weighted sum of the chosen experts' outputs. Ties go to the lower expert index (a stable
    descending sort), as fastgen breaks them."""

    def __init__(self, c, device=None):
        super().__init__()
        self.top_k = c["n_experts_per_tok"]
        self.gate = nn.Linear(c["dim"], c["n_experts"], bias=False, dtype=DTYPE, device=device)
        self.experts = nn.ModuleList(FeedForward(c["dim"], c["hidden_dim"], device)
                                     for _ in range(c["n_experts"]))

    def forward(self, x):
        bsz, seqlen, dim = x.shape
        x = x.reshape(-1, dim)
        router_logits = self.gate(x)
        routing_weights = F.softmax(router_logits, dim=1, dtype=DTYPE)
        routing_weights, selected = torch.sort(routing_weights, dim=-1, descending=True, stable=True)
        routing_weights, selected = routing_weights[:, :self.top_k], selected[:, :self.top_k]
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(selected == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * routing_weights[tok, slot, None])
        return out.reshape(bsz, seqlen, dim)


class TransformerBlock(nn.Module):
    def __init__(self, c, device=None):
        super().__init__()
        self.attention = Attention(c, device)
        if c.get("n_experts", 0):
            self.feed_forward = SparseMoe(c, device)
        else:
            self.feed_forward = FeedForward(c["dim"], c["hidden_dim"], device)
        self.attention_norm = RMSNorm(c["dim"], c["norm_eps"], device)
        self.ffn_norm = RMSNorm(c["dim"], c["norm_eps"], device)

    def forward(self, x, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, c, device=None):
        super().__init__()
        self.config = c
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["dim"], dtype=DTYPE, device=device)
        self.layers = nn.ModuleList(TransformerBlock(c, device) for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["dim"], c["norm_eps"], device)
        self.output = nn.Linear(c["dim"], c["vocab_size"], bias=False, dtype=DTYPE, device=device)
        if c["tie_embeddings"]:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def forward(self, tokens):
        """tokens [batch, seq] at positions 0..seq-1 -> logits [batch, seq, vocab] (float64)."""
        seqlen = tokens.shape[1]
        freqs_cis = precompute_freqs_cis(self.config["head_dim"], seqlen, self.config["rope_theta"],
                                         self.config.get("rope_scaling"))
        mask = torch.triu(torch.full((seqlen, seqlen), float("-inf"), dtype=DTYPE), diagonal=1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h))


def round_activations(x):
    """x rounded to 15-bit integers per 32-column block as fastgen's CPU int8/int4 matmuls round it
    (ops.h, quantize_activations): in float32, d = max|x| / 16256 and v = round(x * (16256 / max|x|)),
    ties to even; the matmul then sees v * d."""
    cols = x.shape[-1]
    x32 = F.pad(x.to(torch.float32), (0, (-cols) % 32))
    blocks = x32.reshape(*x32.shape[:-1], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 16256 / amax, torch.zeros_like(amax))
    v = torch.round(blocks * inv).clamp(-16256, 16256)
    return (v.to(DTYPE) * (amax / 16256).to(DTYPE)).reshape(x32.shape)[..., :cols]


def round_int_inputs(model, path, config):
    """Every Linear whose weight the file stores as int8/int4 (I8/U8) gets round_activations on
    its input; with tied embeddings the classifier reads tok_embeddings."""
    dtypes = modelbin.tensor_dtypes(path)
    modules = dict(model.named_modules())
    for name, dtype in dtypes.items():
        if dtype not in ("I8", "U8") or not name.endswith(".weight"):
            continue
        module = name[:-len(".weight")]
        if module == "tok_embeddings":
            if not config["tie_embeddings"]:
                continue
            module = "output"
        if isinstance(modules.get(module), nn.Linear):
            modules[module].register_forward_pre_hook(lambda _m, inputs: (round_activations(inputs[0]),))


def load_transformer(path):
    # Quantized matrices (int8, int4, as GGUF imports keep them) come back dequantized: the
    # reference runs the weights the file holds, in float64.
    try:
        config, meta, tensors = modelbin.read_model(path)
    except modelbin.ModelBinError as e:
        sys.exit(str(e))
    # Built on the meta device and then given uninitialised storage, so a big model is neither
    # randomly initialised nor held twice; each weight is then copied in (float32 -> float64).
    model = Transformer(config, device="meta").to_empty(device="cpu")
    if config["tie_embeddings"]:
        model.output.weight = model.tok_embeddings.weight
    params = model.state_dict(keep_vars=True)
    names = set(tensors) - {"tokenizer.model", "tokenizer.json"}
    want = set(params) - ({"output.weight"} if config["tie_embeddings"] else set())
    if names != want:
        sys.exit("%s: tensors do not match the model: missing %s, unexpected %s"
                 % (path, sorted(want - names) or "none", sorted(names - want) or "none"))
    with torch.no_grad():
        for name in sorted(want):
            src = torch.from_numpy(np.array(tensors.pop(name), dtype=np.float32))
            params[name].copy_(src.reshape(params[name].shape))
    model.eval()
    tok = tensors.get("tokenizer.model")
    return model, config, (tok.tobytes() if tok is not None else None)


def check_tokens(tokens, config):
    if not tokens:
        sys.exit("no tokens given")
    bad = [t for t in tokens if not 0 <= t < config["vocab_size"]]
    if bad:
        sys.exit("token ids out of range [0, %d): %s" % (config["vocab_size"], bad[:10]))
    if len(tokens) > config["max_seq_len"]:
        sys.exit("%d tokens exceed max_seq_len %d" % (len(tokens), config["max_seq_len"]))


def sp_processor(tok_bytes):
    import sentencepiece as spm
    if tok_bytes is None:
        sys.exit("the model has no embedded tokenizer.model")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tok_bytes)
    return sp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="comma-separated token ids, e.g. 1,5,9")
    src.add_argument("--prompt", help="text to encode with the embedded tokenizer (BOS prepended)")
    ap.add_argument("--out", help="write logits as float32 [n_tokens][vocab] to this file")
    ap.add_argument("--greedy", type=int, metavar="N", help="generate N tokens greedily")
    ap.add_argument("--stop-at-eos", action="store_true", help="with --greedy: stop after eos_id")
    ap.add_argument("--text", action="store_true", help="with --greedy: also print the decoded text")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--int16-activations", action="store_true",
                    help="round the input of int8/int4 matrices to int16 per 32 columns, as fastgen's CPU does")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    model, config, tok_bytes = load_transformer(args.model)
    if args.int16_activations:
        round_int_inputs(model, args.model, config)
    if args.prompt is not None:
        sp = sp_processor(tok_bytes)
        tokens = [config["bos_id"]] + sp.EncodeAsIds(args.prompt)
    else:
        try:
            tokens = [int(t) for t in args.tokens.replace(" ", "").split(",") if t != ""]
        except ValueError:
            sys.exit("--tokens must be comma-separated integers, got %r" % args.tokens)
    check_tokens(tokens, config)

    if args.greedy is not None:
        if args.out:
            sys.exit("--out and --greedy do not go together")
        seq = list(tokens)
        generated = []
        for _ in range(args.greedy):
            if len(seq) >= config["max_seq_len"]:
                print("stopped at max_seq_len %d" % config["max_seq_len"], file=sys.stderr)
                break
            logits = model(torch.tensor([seq], dtype=torch.long))[0, -1]
            nxt = int(torch.argmax(logits))
            generated.append(nxt)
            seq.append(nxt)
            if args.stop_at_eos and nxt == config["eos_id"]:
                break
        print(",".join(str(t) for t in generated))
        if args.text:
            print(sp_processor(tok_bytes).DecodeIds(generated))
        return

    logits = model(torch.tensor([tokens], dtype=torch.long))[0]
    if args.out:
        logits.numpy().astype("<f4").tofile(args.out)
    else:
        print(",".join(str(int(i)) for i in torch.argmax(logits, dim=-1)))


if __name__ == "__main__":
    main()
