// tests/test_main.cpp: the doctest runner for every tests/test_*.cpp file. --simd=NAME (before or
// among doctest's flags) runs the whole suite on one SIMD target of the CPU kernels (ops.h
// cpu_simd_targets); --simd=list prints the targets this build and CPU run, best first (.ci/run
// runs the kernel and model tests once per target).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ops.h"

int main(int argc, char** argv) {
    std::vector<char*> args;
    for (int i = 0; i < argc; i++) {
        if (std::strcmp(argv[i], "--simd=list") == 0) {
            for (const std::string& t : cpu_simd_targets()) std::printf("%s\n", t.c_str());
            return 0;
        }
        if (std::strncmp(argv[i], "--simd=", 7) == 0) {
            std::string why;
            if (!cpu_set_simd_target(argv[i] + 7, &why)) {
                std::fprintf(stderr, "run_tests: --simd: %s\n", why.c_str());
                return 1;
            }
            continue;
        }
        args.push_back(argv[i]);
    }
    std::printf("[fastgen] CPU kernels' SIMD target: %s\n", cpu_simd_target().c_str());
    doctest::Context ctx;
    ctx.applyCommandLine(int(args.size()), args.data());
    return ctx.run();
}
