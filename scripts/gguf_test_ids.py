#!/usr/bin/env python3
"""gguf_test_ids.py: the token ids tests/test_gguf.cpp's SmolLM2 end-to-end check reads.

Encodes the first 800 characters of tests/data/tinystory.txt with the tokenizer.json that
`quantize --from SmolLM2-135M-Instruct.Q4_1.gguf` embeds in model.bin, using the Hugging Face
tokenizers library (PyPI; pyenv python3), and writes them comma-separated to
tests/data/smollm2_tinystory_ids.txt. The ids are only a natural English token sequence for the
test's mean NLL bound; any faithful tokenization would serve.

Usage: python3 scripts/gguf_test_ids.py MODEL.bin
"""
import os
import sys

from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelbin  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if len(sys.argv) != 2:
    sys.exit(__doc__.strip().splitlines()[-1])
_, _, tensors = modelbin.read_model(sys.argv[1], check_format=False)
tok = Tokenizer.from_str(bytes(tensors["tokenizer.json"]).decode("utf-8"))
text = open(os.path.join(root, "tests/data/tinystory.txt"), encoding="utf-8").read()[:800]
ids = tok.encode(text).ids
with open(os.path.join(root, "tests/data/smollm2_tinystory_ids.txt"), "w") as f:
    f.write(",".join(map(str, ids)) + "\n")
print("%d ids" % len(ids))
