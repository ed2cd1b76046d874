// tests/fuzz/fuzz_hf.cpp: a Hugging Face folder: config.json, model.safetensors or an index and
// its shards, tokenizer.json / tokenizer.model / tokenizer_config.json, through the converter
// (every --mode); whatever it writes must load (fuzz_convert_then_load).
//
// Input: two option bytes, then files, each introduced by a line "@@FILE name" (names outside
// kNames are skipped). scripts/fuzz_seeds.py writes the seeds in this shape.
#include <sys/stat.h>

#include <cstdio>
#include <string>

#include "fuzz_util.h"

static const char* const kNames[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                     "tokenizer.json", "tokenizer.model", "tokenizer_config.json"};

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    ConvertOptions o = fuzz_convert_options(data, size);
    const std::string dir = fuzz_temp_dir() + "/hf";
    mkdir(dir.c_str(), 0700);  // once; then each run removes the files the last one wrote
    for (const char* name : kNames) std::remove((dir + "/" + name).c_str());
    const std::string in(reinterpret_cast<const char*>(data), size), marker = "@@FILE ";
    for (size_t at = in.find(marker); at != std::string::npos;) {
        const size_t name_end = in.find('\n', at);
        if (name_end == std::string::npos) break;
        const std::string name = in.substr(at + marker.size(), name_end - at - marker.size());
        size_t next = in.find("\n" + marker, name_end);
        const size_t end = next == std::string::npos ? in.size() : next;
        if (next != std::string::npos) next++;
        for (const char* known : kNames)
            if (name == known)  // end == name_end: a marker line right after this one, an empty file
                fuzz_write("hf/" + name, in.data() + name_end + 1, end > name_end ? end - name_end - 1 : 0);
        at = next;
    }
    o.input = dir;
    fuzz_convert_then_load(o);
    return 0;
}
