// convert.h: turns a checkpoint (llama2.c .bin, Hugging Face safetensors folder, or a fastgen
// model.bin) into model.bin at f32/bf16/f16. The quantize program is a thin CLI over this.
#pragma once
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

struct ConvertOptions {
    std::string input;          // llama2.c .bin (legacy or version 1), HF folder, or model.bin
    std::string output;         // model.bin to write (atomically: temp file, then rename)
    std::string tokenizer;      // sentencepiece .model: needed for llama2.c; overrides the others
    std::string mode = "auto";  // auto (keep the source float type) | f32 | bf16 | f16 | int8 | int4
    int group = 32;             // int4: columns per group (32, 64 or 128)
    // int8/int4: quantize tok_embeddings and output too (default: they stay in the source float type)
    bool quantize_embeddings = false;
    // int4: matrices whose columns the group does not divide go to int8 instead of being refused
    bool int8_fallback = false;
    bool progress = true;       // what was found, and a percentage while writing, on stderr
};

struct ConvertStats {
    std::string kind;   // "llama2.c", "Hugging Face", "model.bin"
    std::string dtype;  // matrices' dtype in the output ("BF16", ..., "int8", "int4-g32")
    // int8/int4: each quantized matrix's ||w - dequantize(quantize(w))|| / ||w||, in file order
    std::vector<std::pair<std::string, double>> rel_errors;
    size_t source_matrix_bytes = 0;  // quantized matrices' bytes as f32
    size_t quant_matrix_bytes = 0;   // the same matrices quantized (values, scales, int4 minimums)
    size_t tensors = 0;
    size_t bytes = 0;   // size of the written file
    double seconds = 0;
};

// Detects the input kind, checks every tensor's presence and shape, and writes opts.output.
// Bad input throws Error naming the file, tensor and problem.
ConvertStats convert_checkpoint(const ConvertOptions& opts);
