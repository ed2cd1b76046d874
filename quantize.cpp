// quantize.cpp: the quantize program: turns a checkpoint (llama2.c .bin, Hugging Face folder,
// model.bin, or a llama.cpp GGUF file) into fastgen's model.bin. The work is in convert.cpp; this is
// the command line.
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <string>

#include "common.h"
#include "convert.h"
#include "gguf.h"

// The output's folder must exist and the output itself must not be a folder; checked before any
// work, so a typo does not cost a long conversion.
static std::string check_output_path(std::string& p) {
    struct stat st;
    if (stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return "output is a directory: " + p;
    if (stat(p.c_str(), &st) == 0 && !S_ISREG(st.st_mode))  // the rename would replace a device node
        return "output exists and is not a regular file (a device or pipe): " + p;
    size_t slash = p.rfind('/');
    std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : p.substr(0, slash);
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return "output directory does not exist: " + dir;
    return "";
}

int main(int argc, char** argv) {
    CLI::App app{"quantize: convert a llama2.c .bin, a Hugging Face folder, a model.bin or a GGUF file into "
                 "model.bin"};
    ConvertOptions o;
    std::string gguf;
    bool quiet = false;
    auto* input = app.add_option("-i,--input", o.input,
                                 "checkpoint: llama2.c .bin, Hugging Face folder (config.json + safetensors), "
                                 "model.bin, or a GGUF file (recognised by its magic)")
                      ->check(CLI::ExistingPath);
    app.add_option("--from", gguf,
                   "a llama.cpp GGUF file (architecture llama; tensors F32/F16/BF16/Q8_0/Q4_0/Q4_1). With --mode "
                   "auto its Q8_0/Q4_0/Q4_1 blocks are kept exactly (grouped int8 / int4 with zero points or "
                   "minimums); other modes dequantize and re-encode. The tokenizer and chat template come along")
        ->check(CLI::ExistingFile)
        ->check(CLI::Validator([](std::string& p) { return is_gguf_file(p) ? "" : "not a GGUF file: " + p; }, "GGUF"))
        ->excludes(input);
    app.add_option("-o,--output", o.output, "model.bin to write (written to a temporary name, then renamed)")
        ->required()
        ->check(CLI::Validator(check_output_path, "PATH"));
    app.add_option("-m,--mode", o.mode,
                   "weight format; auto keeps the source's float type; int8: symmetric, a scale per output "
                   "channel; int4: a scale and a minimum per group of --groupsize columns (w = q * scale + min)")
        ->check(CLI::IsMember({"auto", "f32", "bf16", "f16", "int8", "int4"}))
        ->capture_default_str();
    app.add_option("-g,--groupsize", o.group, "int4: columns per group")
        ->check(CLI::IsMember({32, 64, 128}))
        ->capture_default_str();
    app.add_flag("--quantize-embeddings", o.quantize_embeddings,
                 "int8/int4: quantize tok_embeddings and output too (default: keep the source float type)");
    app.add_flag("--int8-fallback", o.int8_fallback,
                 "int4: store matrices whose columns the group size does not divide as int8 (default: refuse)");
    app.add_option("-t,--tokenizer", o.tokenizer,
                   "sentencepiece tokenizer.model (required for llama2.c; overrides the one in the input)")
        ->check(CLI::ExistingFile);
    app.add_flag("-q,--quiet", quiet, "no progress output");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 1;  // --help is not an error; bad flags exit 1
    }
    o.progress = !quiet;
    if (!gguf.empty()) o.input = gguf;
    if (o.input.empty()) {
        std::fprintf(stderr, "error: an input is required: --input CHECKPOINT or --from FILE.gguf\n");
        return 1;
    }

    std::printf("quantize: input %s, output %s, mode %s, tokenizer %s", o.input.c_str(), o.output.c_str(),
                o.mode.c_str(), o.tokenizer.empty() ? "(from the input)" : o.tokenizer.c_str());
    if (o.mode == "int4") std::printf(", groupsize %d%s", o.group, o.int8_fallback ? ", int8 fallback" : "");
    if (o.mode == "int4" || o.mode == "int8")
        std::printf(", embeddings %s", o.quantize_embeddings ? "quantized" : "kept float");
    std::printf("\n");
    try {
        ConvertStats st = convert_checkpoint(o);
        if (!st.rel_errors.empty()) {
            double worst = 0, sum = 0;
            for (const auto& [name, err] : st.rel_errors) {
                if (!quiet) std::printf("  %-40s rel. error %.5f\n", name.c_str(), err);
                worst = std::max(worst, err);
                sum += err;
            }
            std::printf("%zu matrices quantized: relative error mean %.5f, max %.5f; %.1f MB as f32 -> %.1f MB "
                        "(%.2fx smaller)\n", st.rel_errors.size(), sum / double(st.rel_errors.size()), worst,
                        double(st.source_matrix_bytes) / 1e6, double(st.quant_matrix_bytes) / 1e6,
                        double(st.source_matrix_bytes) / double(st.quant_matrix_bytes));
        }
        std::printf("wrote %s: %s, %zu tensors, %.1f MB in %.2f s (from a %s checkpoint)\n", o.output.c_str(),
                    st.dtype.c_str(), st.tensors, double(st.bytes) / 1e6, st.seconds, st.kind.c_str());
    } catch (const Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {  // out of memory, a library's exception: still no terminate
        std::fprintf(stderr, "error: internal: %s\n", e.what());
        return 1;
    }
    return 0;
}
