// convert.h: turns a checkpoint (llama2.c .bin, Hugging Face safetensors folder, or a fastgen
// model.bin) into model.bin at f32/bf16/f16. The quantize program is a thin CLI over this.
#pragma once
#include <cstddef>
#include <string>

struct ConvertOptions {
    std::string input;          // llama2.c .bin (legacy or version 1), HF folder, or model.bin
    std::string output;         // model.bin to write (atomically: temp file, then rename)
    std::string tokenizer;      // sentencepiece .model: needed for llama2.c; overrides the others
    std::string mode = "auto";  // auto (keep the source float type) | f32 | bf16 | f16
    bool progress = true;       // what was found, and a percentage while writing, on stderr
};

struct ConvertStats {
    std::string kind;   // "llama2.c", "Hugging Face", "model.bin"
    std::string dtype;  // matrices' dtype in the output ("BF16", ...)
    size_t tensors = 0;
    size_t bytes = 0;   // size of the written file
    double seconds = 0;
};

// Detects the input kind, checks every tensor's presence and shape, and writes opts.output.
// Bad input throws Error naming the file, tensor and problem.
ConvertStats convert_checkpoint(const ConvertOptions& opts);
