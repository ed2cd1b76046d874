# Makefile: builds generate, quantize and the tests; the CUDA backend when nvcc is found.
#   make            build everything this machine can
#   make test       build and run the test suite
#   make test-asan  the CPU suite under AddressSanitizer and UBSan
#   make fuzz       the libFuzzer harnesses (clang), each FUZZ_SECONDS (default 30)
#   make setup      install the Debian packages the project needs (scripts/setup.sh)
#   make bench      CPU (and GPU when present) benchmarks (scripts/bench.sh)
# Overrides: ARCH=... (the baseline CPU; the kernels pick their SIMD target at run time whatever it
# is), CUDA_ARCH="-gencode ..." (GPU targets), NVCC=path.

CXX      ?= g++
# A portable baseline: the CPU kernels are compiled for every SIMD target (Highway: SSE4, AVX2,
# AVX-512, AVX-512 VNNI; NEON) and choose the best at run time, so one build runs fast anywhere.
# (-march=native would drop the targets below the build machine's, and with them their tests.)
# x86: x86-64-v2 (SSE4.2) with AES and CLMUL, Highway's SSE4 target, so no scalar fallback is built.
ifeq ($(shell uname -m),x86_64)
  ARCH   ?= -march=x86-64-v2 -maes -mpclmul
else
  ARCH   ?=
endif
BUILD    ?= build
# Open MPI (tensor parallel): its wrapper compiler knows the include and library flags.
MPI_CFLAGS := $(shell mpicxx --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicxx --showme:link 2>/dev/null || echo -lmpi)
# -ffp-contract=off: a multiply and an add fuse only where the code says so (batch invariance: no
# path may get an FMA that another does not). -I.: Highway re-includes kernels_cpu.cpp by name.
# cpp-httplib (the server): Debian builds it as a library with TLS and compression, and its
# classes' layout follows these defines, so the code that includes httplib.h must see them too.
HTTPLIB_CFLAGS := -DCPPHTTPLIB_OPENSSL_SUPPORT -DCPPHTTPLIB_ZLIB_SUPPORT -DCPPHTTPLIB_BROTLI_SUPPORT
CXXFLAGS := -std=c++17 -O3 $(ARCH) -ffp-contract=off -fopenmp -Wall -Wextra -Werror -MMD -MP -I. $(MPI_CFLAGS) $(HTTPLIB_CFLAGS)
LDLIBS   := -lsentencepiece -lpcre2-8 -lhwy -lcpp-httplib -pthread -fopenmp $(MPI_LIBS)

# Library code shared by the programs and the tests.
CORE := common safetensors model kv_cache kernels_cpu quantize_rows tokenizer bpe sampler convert decode batch tp gguf chat serve

# The flags without the CUDA backend's: the emulated CUDA build (below) starts from these.
CPU_CXXFLAGS := $(CXXFLAGS)
CPU_LDLIBS   := $(LDLIBS)

NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifneq ($(NVCC),)
  CUDA_HOME  := $(patsubst %/bin/nvcc,%,$(NVCC))
  CUDA_ARCH  ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
                -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90a,code=sm_90a \
                -gencode arch=compute_90,code=compute_90
  NVCCFLAGS  := -std=c++17 -O3 $(CUDA_ARCH) -Xcompiler "-Wall -Wextra -Werror" -MMD -MP
  CUDA_OBJS  := $(BUILD)/kernels_cuda.o
  CXXFLAGS   += -DFASTGEN_CUDA -I$(CUDA_HOME)/include
  LDLIBS     += -L$(CUDA_HOME)/lib64 -lcudart -lcublas -lnccl -Wl,-rpath,$(CUDA_HOME)/lib64
else
  $(info nvcc not found: building the CPU backend only)
  CUDA_OBJS  :=
endif

CORE_OBJS := $(CORE:%=$(BUILD)/%.o) $(CUDA_OBJS)
TEST_SRCS := $(wildcard tests/test_*.cpp)
TEST_OBJS := $(TEST_SRCS:tests/%.cpp=$(BUILD)/tests/%.o)

all: generate quantize $(BUILD)/run_tests

generate: $(BUILD)/generate.o $(CORE_OBJS)
	$(CXX) -o $@ $^ $(LDLIBS)

quantize: $(BUILD)/quantize.o $(CORE_OBJS)
	$(CXX) -o $@ $^ $(LDLIBS)

$(BUILD)/run_tests: $(TEST_OBJS) $(CORE_OBJS)
	$(CXX) -o $@ $^ $(LDLIBS)

$(BUILD)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/tests/%.o: tests/%.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -I. -c $< -o $@

# Benchmark programs (scripts/bench_*.cpp, not part of `make` or `make test`): make build/bench_matmul
$(BUILD)/bench_%: scripts/bench_%.cpp $(CORE_OBJS)
	$(CXX) $(CXXFLAGS) -I. $< $(CORE_OBJS) $(LDLIBS) -o $@

$(BUILD)/kernels_cuda.o: kernels.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

# The gpu suite (tests/test_gpu.cpp, tests/test_tp_gpu.cpp) on the CPU, no GPU or nvcc needed:
# kernels.cu compiled by g++ against the CUDA emulator in tests/cuda_emu (scripts/cuda_emu_source.py
# rewrites its launches first), the core compiled in a folder of its own as for a CUDA build
# (FASTGEN_CUDA) but with the emulator's cuda_runtime.h and nccl.h (NCCL over MPI) found first and
# no libcudart or libnccl linked; FASTGEN_CUDA_EMU tells the tests they run emulated. Plus the
# emulator's own tests (tests/cuda_emu/emu_selftest.cu, nccl_selftest.cpp), and generate_emu beside
# run_tests_emu for test_tp_gpu's `mpirun -np 2 generate --device cuda` on two emulated devices.
EMU := $(BUILD)/emu
EMU_CXXFLAGS := -Itests/cuda_emu $(CPU_CXXFLAGS) -DFASTGEN_CUDA -DFASTGEN_CUDA_EMU
# g++ sees the kernels' bodies, which nvcc's host pass never shows it: threadIdx.x is unsigned
# (comparisons with ints), and its flow analysis cannot follow loads and uses under one condition.
EMU_KERNEL_FLAGS := $(EMU_CXXFLAGS) -I. -Wno-sign-compare -Wno-maybe-uninitialized
EMU_OBJS := $(CORE:%=$(EMU)/%.o) $(EMU)/kernels_cuda.o $(EMU)/cuda_emu.o $(EMU)/nccl_emu.o
EMU_TEST_OBJS := $(addprefix $(EMU)/tests/,test_gpu.o test_tp_gpu.o test_util.o test_main.o emu_selftest.o) \
                 $(EMU)/nccl_selftest.o
# Two emulated devices, so test_tp_gpu's tensor-parallel cases run (one rank per device); 64 KB
# dequantize slabs (kernels.cu gemm), so the tests' quantized matrices take several.
EMU_RUN := env -u CUDA_VISIBLE_DEVICES FASTGEN_EMU_DEVICES=2 FASTGEN_CUDA_DEQUANT_SLAB=65536 ./$(BUILD)/run_tests_emu -ts='gpu,cuda emulator'
# make test leaves out the slowest emulated cases (~3 min together): test-emu runs them too.
EMU_SLOW := -tce='*long contexts*,*SmolLM2*'

$(BUILD)/run_tests_emu: $(EMU_TEST_OBJS) $(EMU_OBJS)
	$(CXX) -o $@ $^ $(CPU_LDLIBS)

$(BUILD)/generate_emu: $(EMU)/generate.o $(EMU_OBJS)
	$(CXX) -o $@ $^ $(CPU_LDLIBS)

$(EMU)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

$(EMU)/tests/%.o: tests/%.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -I. -c $< -o $@

$(EMU)/kernels_cuda.cpp: kernels.cu kernels_attention.cuh scripts/cuda_emu_source.py
	@mkdir -p $(dir $@)
	python3 scripts/cuda_emu_source.py $< $@

$(EMU)/tests/emu_selftest.cpp: tests/cuda_emu/emu_selftest.cu scripts/cuda_emu_source.py
	@mkdir -p $(dir $@)
	python3 scripts/cuda_emu_source.py $< $@

$(EMU)/kernels_cuda.o $(EMU)/tests/emu_selftest.o: %.o: %.cpp
	$(CXX) $(EMU_KERNEL_FLAGS) -c $< -o $@

$(EMU)/cuda_emu.o $(EMU)/nccl_emu.o $(EMU)/nccl_selftest.o: $(EMU)/%.o: tests/cuda_emu/%.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_KERNEL_FLAGS) -c $< -o $@

test: generate quantize $(BUILD)/run_tests $(BUILD)/run_tests_emu $(BUILD)/generate_emu
	./$(BUILD)/run_tests
	$(EMU_RUN) $(EMU_SLOW)

# The whole emulated gpu suite (and the emulator's own tests), long-context attention and SmolLM2 included.
test-emu: $(BUILD)/run_tests_emu $(BUILD)/generate_emu
	$(EMU_RUN)

setup:
	bash scripts/setup.sh

bench: generate quantize
	bash scripts/bench.sh

# The CPU suite built with AddressSanitizer and UBSan in $(BUILD)/asan (not part of `make test`:
# most of its time compiling the kernels for four SIMD targets under the
# sanitizers). Leak reports are off: MPI and OpenMP keep allocations until exit.
SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer
test-asan: generate quantize
	$(MAKE) NVCC= BUILD=$(BUILD)/asan ARCH="$(ARCH) $(SANITIZE)" LDLIBS="$(CPU_LDLIBS) $(SANITIZE)" $(BUILD)/asan/run_tests
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ./$(BUILD)/asan/run_tests

# libFuzzer harnesses (tests/fuzz/fuzz_*.cpp: one per untrusted input), built by clang with ASan and
# UBSan in $(BUILD)/fuzz, the core code instrumented for coverage (fuzzer-no-link). Highway builds
# only the baseline SIMD target here (HWY_COMPILE_ONLY_STATIC): the harnesses fuzz the readers, not
# the kernels (make test-asan covers those), and four targets under the sanitizers take minutes.
#   make fuzz-build                 build every harness
#   make fuzz FUZZ_SECONDS=30       run each for that long over a scratch copy of its seeds
#                                   (tests/data/fuzz/NAME), failing on any report; new crashes
#                                   are left in $(BUILD)/fuzz/NAME-crashes
#   make fuzz FUZZ_NAMES="gguf hf"  only those harnesses (two makes with halves of the list use
#                                   both cores: RELIABILITY.md's long runs)
#   build/fuzz/fuzz_gguf FILE...    replay inputs (a crash file, a seed folder)
FUZZ_CXX     ?= clang++
FUZZ_DIR     := $(BUILD)/fuzz
FUZZ_SECONDS ?= 30
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
# -Wno-pass-failed: at -O1 under ASan clang cannot honour `omp simd` (it warns; speed is not the point here).
FUZZ_FLAGS   := -std=c++17 -O1 -g $(ARCH) -ffp-contract=off -fopenmp -Wall -Wextra -Werror -Wno-pass-failed -MMD -MP -I. \
                $(MPI_CFLAGS) $(HTTPLIB_CFLAGS) -DHWY_COMPILE_ONLY_STATIC=1 $(FUZZ_SAN)
FUZZ_NAMES   := $(patsubst tests/fuzz/fuzz_%.cpp,%,$(wildcard tests/fuzz/fuzz_*.cpp))
FUZZ_BINS    := $(FUZZ_NAMES:%=$(FUZZ_DIR)/fuzz_%)
FUZZ_CORE    := $(CORE:%=$(FUZZ_DIR)/%.o)

fuzz-build: $(FUZZ_BINS)
# Objects reached only through the pattern rules below: keep them (make deletes intermediates).
.SECONDARY: $(FUZZ_CORE)

$(FUZZ_DIR)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.cpp tests/fuzz/fuzz_util.h $(FUZZ_CORE)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer -DFUZZ_DATA_DIR='"$(CURDIR)/tests/data/fuzz"' $< $(FUZZ_CORE) \
	  $(CPU_LDLIBS) -o $@

# Each harness on one core for FUZZ_SECONDS (the JSON readers with tests/fuzz/json.dict, GGUF with
# tests/fuzz/gguf.dict); the corpus grows in a scratch copy (the committed seeds
# stay small). Temp files go to /dev/shm when there is one. Leaks are not reported: the readers'
# caches (a tokenizer per harness) live until exit.
fuzz: fuzz-build
	@set -e; tmp=$$(test -d /dev/shm && echo /dev/shm || echo /tmp); fail=0; \
	for n in $(FUZZ_NAMES); do \
	  corpus=$(FUZZ_DIR)/$$n-corpus; crashes=$(FUZZ_DIR)/$$n-crashes; \
	  rm -rf $$corpus $$crashes; mkdir -p $$corpus $$crashes; cp tests/data/fuzz/$$n/* $$corpus/; \
	  case $$n in gguf) dict=tests/fuzz/gguf.dict;; hf|request|serve|tokenizer) dict=tests/fuzz/json.dict;; *) dict=;; esac; \
	  echo "== fuzz $$n: $(FUZZ_SECONDS) s"; \
	  if TMPDIR=$$tmp ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	     ./$(FUZZ_DIR)/fuzz_$$n -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
	       -artifact_prefix=$$crashes/ $${dict:+-dict=$$dict} $$corpus > $(FUZZ_DIR)/$$n.log 2>&1; then \
	    grep -E '^(stat::number_of_executed_units|#[0-9]+ *DONE)' $(FUZZ_DIR)/$$n.log | tail -2; \
	  else \
	    tail -60 $(FUZZ_DIR)/$$n.log; echo "fuzz $$n FAILED: the input is in $$crashes/"; fail=1; \
	  fi; \
	done; exit $$fail

clean:
	rm -rf $(BUILD) generate quantize

.PHONY: all test test-emu test-asan fuzz fuzz-build setup bench clean
-include $(wildcard $(BUILD)/*.d $(BUILD)/tests/*.d $(EMU)/*.d $(EMU)/tests/*.d $(FUZZ_DIR)/*.d)
