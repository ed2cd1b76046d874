// tests/fuzz/fuzz_util.h: what the libFuzzer harnesses share: a private temp folder for the files
// a reader wants by path, the seed folder's path, and the rule every harness checks: bad input
// raises the project's Error and nothing else (libFuzzer reports any other exception as a crash,
// and ASan/UBSan report memory errors and undefined behaviour).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "tokenizer.h"

// tests/data/fuzz, set by the Makefile (seeds and fixed inputs such as a tokenizer the harnesses use).
#ifndef FUZZ_DATA_DIR
#error "build the harnesses with make fuzz-build (it defines FUZZ_DATA_DIR)"
#endif

// One folder per process under $TMPDIR (or /tmp), made on first use and removed at exit: each
// harness writes only there.
inline const std::string& fuzz_temp_dir() {
    static const std::string dir = [] {
        const char* base = std::getenv("TMPDIR");
        std::string tmpl = std::string(base && *base ? base : "/tmp") + "/fastgen-fuzz-XXXXXX";
        if (!mkdtemp(tmpl.data())) {
            std::perror("fuzz: mkdtemp");
            std::abort();
        }
        static std::string removal;
        removal = "rm -rf '" + tmpl + "'";
        std::atexit([] { (void)!std::system(removal.c_str()); });
        return tmpl;
    }();
    return dir;
}

// Writes bytes to NAME in the temp folder (replacing it); its path.
inline std::string fuzz_write(const std::string& name, const void* data, size_t size) {
    const std::string path = fuzz_temp_dir() + "/" + name;
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) {
        std::perror(path.c_str());
        std::abort();
    }
    const bool written = !size || std::fwrite(data, 1, size, f) == size;
    if (std::fclose(f) != 0 || !written) {
        std::fprintf(stderr, "fuzz: %s: writing %zu bytes failed\n", path.c_str(), size);
        std::abort();
    }
    return path;
}

// A file of the seed folder, whole (abort when missing: the harness cannot run without it).
inline std::string fuzz_data(const std::string& name) {
    const std::string path = std::string(FUZZ_DATA_DIR) + "/" + name;
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) {
        std::perror(path.c_str());
        std::abort();
    }
    std::string s;
    char buf[65536];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) s.append(buf, n);
    std::fclose(f);
    return s;
}

// An invariant of accepted input broken: print it and abort, so libFuzzer saves the input.
#define FUZZ_CHECK(cond, ...)                                                   \
    do {                                                                        \
        if (!(cond)) {                                                          \
            std::fprintf(stderr, "fuzz invariant broken: %s: ", #cond);         \
            std::fprintf(stderr, __VA_ARGS__);                                  \
            std::fprintf(stderr, "\n");                                         \
            std::abort();                                                       \
        }                                                                       \
    } while (0)

// The text of `ids` as a streaming client receives it (StreamDecoder, pushed one id at a time).
inline std::string fuzz_stream_decode(const Tokenizer& tok, const std::vector<int>& ids) {
    StreamDecoder stream(tok);
    std::string text;
    for (int id : ids) text += stream.push(id);
    return text + stream.flush();
}

// ---------------------------------------------------------------------------------------------
// The converter harnesses (llama2.c, Hugging Face, GGUF): options from the input's first two
// bytes, then the oracle: whatever convert_checkpoint writes, generate must load.
#include <cmath>

#include "convert.h"
#include "model.h"
#include "ops.h"

// Byte 0 picks the mode, byte 1 the int4 group and the flags; both are consumed.
inline ConvertOptions fuzz_convert_options(const uint8_t*& data, size_t& size) {
    static const char* const modes[] = {"auto", "f32", "bf16", "f16", "int8", "int4"};
    static const int groups[] = {32, 64, 128, 32};
    ConvertOptions o;
    o.progress = false;
    if (size < 2) return o;
    o.mode = modes[data[0] % 6];
    o.group = groups[data[1] & 3];
    o.int8_fallback = data[1] & 4;
    o.quantize_embeddings = data[1] & 8;
    data += 2;
    size -= 2;
    return o;
}

// Converts (an Error ends it: refused input); a conversion that succeeds must have finite
// quantization errors, and its output must load as generate loads it, tokenizer included.
inline void fuzz_convert_then_load(ConvertOptions o) {
    o.output = fuzz_temp_dir() + "/out.bin";
    ConvertStats stats;
    try {
        stats = convert_checkpoint(o);
    } catch (const Error&) {
        return;
    }
    for (const auto& [name, err] : stats.rel_errors)
        FUZZ_CHECK(std::isfinite(err), "%s: relative quantization error %g", name.c_str(), err);
    try {
        Model m(o.output, cpu_ops(1));
        Tokenizer tok(m.tokenizer_model, o.output + ": " + m.tokenizer_tensor);
        FUZZ_CHECK(tok.vocab_size() <= m.cfg.vocab_size, "tokenizer %d tokens, model vocab %d", tok.vocab_size(),
                   m.cfg.vocab_size);
    } catch (const Error& e) {
        FUZZ_CHECK(false, "convert (--mode %s) wrote a file the loader refuses: %s", o.mode.c_str(), e.what());
    }
}
