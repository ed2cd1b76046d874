# Makefile: builds generate, quantize and the tests; the CUDA backend when nvcc is found.
#   make            build everything this machine can
#   make test       build and run the test suite
#   make setup      install the Debian packages the project needs (scripts/setup.sh)
#   make bench      CPU (and GPU when present) benchmarks (scripts/bench.sh)
# Overrides: ARCH=-march=x86-64-v3 (CPU target), CUDA_ARCH="-gencode ..." (GPU targets), NVCC=path.

CXX      ?= g++
ARCH     ?= -march=native
BUILD    ?= build
# Open MPI (tensor parallel): its wrapper compiler knows the include and library flags.
MPI_CFLAGS := $(shell mpicxx --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell mpicxx --showme:link 2>/dev/null || echo -lmpi)
CXXFLAGS := -std=c++17 -O3 $(ARCH) -fopenmp -Wall -Wextra -Werror -MMD -MP $(MPI_CFLAGS)
LDLIBS   := -lsentencepiece -lpcre2-8 -fopenmp $(MPI_LIBS)

# Library code shared by the programs and the tests.
CORE := common safetensors model kernels_cpu tokenizer bpe sampler convert decode batch tp gguf chat

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

$(BUILD)/kernels_cuda.o: kernels.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

test: generate quantize $(BUILD)/run_tests
	./$(BUILD)/run_tests

setup:
	bash scripts/setup.sh

bench: generate quantize
	bash scripts/bench.sh

clean:
	rm -rf $(BUILD) generate quantize

.PHONY: all test setup bench clean
-include $(wildcard $(BUILD)/*.d $(BUILD)/tests/*.d)
