#!/usr/bin/python3
"""gguf_rope_order_nll.py: the numbers behind tests/test_gguf.cpp's RoPE row-order bound.

Mean NLL of the first N ids of tests/data/smollm2_tinystory_ids.txt under reference.py's float64
model of MODEL.bin (SmolLM2 converted by `quantize --from`), once as converted and once with every
wq/wk row moved into Hugging Face's rotate-half order, as if llama.cpp had not permuted them.

Usage: /usr/bin/python3 scripts/gguf_rope_order_nll.py MODEL.bin [N=100]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

if len(sys.argv) not in (2, 3):
    sys.exit(__doc__.strip().splitlines()[-1])
n = int(sys.argv[2]) if len(sys.argv) == 3 else 100
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ids = [int(x) for x in open(os.path.join(root, "tests/data/smollm2_tinystory_ids.txt")).read().split(",")][:n]
model, config, _ = reference.load_transformer(sys.argv[1])


def mean_nll():
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()


def to_rotate_half(w, heads):
    """Meta row h*hd + 2i + j -> HF row h*hd + j*hd/2 + i."""
    hd = config["head_dim"]
    return w.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


print("RoPE order as converted: mean NLL %.4f" % mean_nll())
with torch.no_grad():
    for layer in model.layers:
        layer.attention.wq.weight.copy_(to_rotate_half(layer.attention.wq.weight, config["n_heads"]))
        layer.attention.wk.weight.copy_(to_rotate_half(layer.attention.wk.weight, config["n_kv_heads"]))
print("wq/wk rows in rotate-half order: mean NLL %.4f" % mean_nll())
