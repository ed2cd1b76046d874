#!/usr/bin/env python3
"""gptfast_bench.py: gpt-fast's own generate.py (its main(): decode step under
torch.compile(mode="reduce-overhead", fullgraph=True), one warm-up for compilation, then timed
samples) on random weights of one of its named shapes, made on the GPU, so no checkpoint is written.

gpt-fast (pytorch-labs/gpt-fast) is not part of fastgen and is never committed here: give the folder
of a copy of its source (model.py, generate.py, quantize.py, tokenizer.py, tp.py). Its main() prints
"Time for inference N: ... tokens/sec", "Bandwidth achieved: ... GB/s" per sample and "Average
tokens/sec: ...". Only _load_model is replaced (random weights instead of a file); --int8 quantizes
them with gpt-fast's WeightOnlyInt8QuantHandler as its int8 checkpoints are made.

Usage: python3 scripts/gptfast_bench.py GPT_FAST_DIR --tokenizer tokenizer.model
           [--shape 7B] [--int8] [--prompt-tokens 5] [--max-new-tokens 200] [--samples 3]
"""

import argparse
import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gpt_fast", help="folder with gpt-fast's model.py and generate.py")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece tokenizer.model (gpt-fast's main() loads one)")
    ap.add_argument("--shape", default="7B", help="a name in gpt-fast's transformer_configs (7B: Llama-2-7B)")
    ap.add_argument("--int8", action="store_true", help="int8 weight-only, as gpt-fast's quantize.py makes it")
    ap.add_argument("--prompt-tokens", type=int, default=5, help="synthetic prompt length (gpt-fast's --prompt N)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--samples", type=int, default=3, help="timed runs after the compiling one")
    a = ap.parse_args()

    sys.path.insert(0, os.path.abspath(a.gpt_fast))
    import torch

    if not hasattr(torch.backends.cuda, "sdp_kernel"):  # gone from newer PyTorch; generate.py still calls it
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdp_kernel(enable_flash=True, enable_mem_efficient=True, enable_math=True, **_):
            on = [(SDPBackend.FLASH_ATTENTION, enable_flash), (SDPBackend.EFFICIENT_ATTENTION, enable_mem_efficient),
                  (SDPBackend.MATH, enable_math)]
            return sdpa_kernel([b for b, use in on if use])

        torch.backends.cuda.sdp_kernel = sdp_kernel
    import generate as g  # gpt-fast's
    from model import Transformer

    def random_model(checkpoint_path, device, precision, *_):
        torch.manual_seed(0)
        with torch.device("meta"):  # as gpt-fast's own _load_model, then the weights straight in `precision` on the GPU
            model = Transformer.from_name(checkpoint_path.parent.name)
        model = model.to(dtype=precision).to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():  # matrices N(0, 0.02), norm weights 1
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
                else:
                    p.fill_(1.0)
        if "int8" in checkpoint_path.name:
            from quantize import WeightOnlyInt8QuantHandler
            handler = WeightOnlyInt8QuantHandler(model)
            state = handler.create_quantized_state_dict()
            model = handler.convert_for_runtime()
            model.load_state_dict(state, assign=True)
        print("random weights: gpt-fast shape %s, %s%s" % (checkpoint_path.parent.name, precision,
                                                           ", int8 weight-only" if "int8" in checkpoint_path.name else ""))
        return model.to(device=device).eval()

    g._load_model = random_model
    work = Path(tempfile.mkdtemp(prefix="gptfast-"))
    try:
        folder = work / a.shape  # main() names the shape by the checkpoint's folder
        folder.mkdir()
        shutil.copy(a.tokenizer, folder / "tokenizer.model")
        checkpoint = folder / ("model_int8.pth" if a.int8 else "model.pth")
        checkpoint.touch()  # main() asserts that it exists; random_model never reads it
        args = dict(prompt=a.prompt_tokens, interactive=False, num_samples=a.samples, max_new_tokens=a.max_new_tokens,
                    batch_size=1, top_k=200, temperature=0.8, checkpoint_path=checkpoint, compile=True,
                    compile_prefill=False, profile=None, draft_checkpoint_path=None, speculate_k=5, device="cuda")
        known = inspect.signature(g.main).parameters
        g.main(**{k: v for k, v in args.items() if k in known})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
