// tests/cuda_emu/cuda_emu.cpp: the CUDA emulator's runtime (semantics: cuda_runtime.h's top comment):
// devices, device memory, streams and graphs, launches run block by block with the threads of a
// block as fibers, warp operations, cuBLAS's GemmEx.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

// The running fiber and block, read by the threadIdx/blockIdx/... macros.
namespace emu::detail {
Thread* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;
}  // namespace emu::detail

using namespace emu::detail;

namespace {

// ---------------------------------------------------------------------------------------------
// the fake device

constexpr size_t kTotalMemory = size_t(80) * 1000 * 1000 * 1000;
constexpr int kSMs = 132;
constexpr size_t kSharedDefault = 48 << 10, kSharedOptin = 227 << 10;
constexpr int kMaxThreads = 1024;

std::string vformat(const char* format, va_list ap) {
    va_list aq;
    va_copy(aq, ap);
    const int n = std::vsnprintf(nullptr, 0, format, aq);
    va_end(aq);
    std::string s(size_t(std::max(n, 0)), '\0');
    std::vsnprintf(s.data(), s.size() + 1, format, ap);
    return s;
}
std::string format(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* format, ...) {
    va_list ap;
    va_start(ap, format);
    std::string s = vformat(format, ap);
    va_end(ap);
    return s;
}

// ---------------------------------------------------------------------------------------------
// errors: cudaGetLastError's code, and the detailed message cudaGetErrorString gives for it

cudaError_t g_last_error = cudaSuccess;
std::map<int, std::string> g_messages;  // by code: the latest detailed message

const char* error_name(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
        case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
        case cudaErrorMisalignedAddress: return "misaligned address";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
        case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
        case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    }
    return "unknown error";
}

cudaError_t fail(cudaError_t e, const std::string& message) {
    g_last_error = e;
    g_messages[int(e)] = std::string(error_name(e)) + " (cuda_emu: " + message + ")";
    return e;
}

// ---------------------------------------------------------------------------------------------
// devices: FASTGEN_EMU_DEVICES emulated ones, CUDA_VISIBLE_DEVICES choosing; one per process

constexpr int kMaxDevices = 64;

// The emulated devices this process sees, by ordinal: each one's index among all of them.
std::vector<int> visible_devices() {
    int all = 1;
    if (const char* env = std::getenv("FASTGEN_EMU_DEVICES")) {
        char* end = nullptr;
        const long v = std::strtol(env, &end, 10);
        if (end == env || *end != '\0' || v < 0 || v > kMaxDevices) {
            // A typo here would skip every gpu test as "no GPU": stop instead.
            std::fprintf(stderr, "cuda_emu: FASTGEN_EMU_DEVICES=%s: the number of emulated devices, 0 to %d\n", env,
                         kMaxDevices);
            std::exit(1);
        }
        all = int(v);
    }
    std::vector<int> seen;
    const char* list = std::getenv("CUDA_VISIBLE_DEVICES");
    if (!list) {
        for (int i = 0; i < all; i++) seen.push_back(i);
        return seen;
    }
    // As CUDA reads it: indices separated by commas, the list cut at the first that is not one of
    // the devices or repeats an earlier one (GPU UUIDs are not emulated: they cut it too).
    for (const char* p = list; *p;) {
        char* end = nullptr;
        const long v = std::strtol(p, &end, 10);
        if (end == p || v < 0 || v >= all || std::find(seen.begin(), seen.end(), int(v)) != seen.end()) break;
        seen.push_back(int(v));
        while (*end == ' ') end++;
        if (*end != ',') break;
        p = end + 1;
    }
    return seen;
}

int g_current = 0;   // cudaSetDevice's ordinal
int g_context = -1;  // the device this process drives, once a call made its context

std::string devices_seen(int n) {
    const char* all = std::getenv("FASTGEN_EMU_DEVICES");
    const char* list = std::getenv("CUDA_VISIBLE_DEVICES");
    return format("this process sees %d emulated device%s: FASTGEN_EMU_DEVICES=%s, CUDA_VISIBLE_DEVICES=%s", n,
                  n == 1 ? "" : "s", all ? all : "(unset: 1)", list ? list : "(unset)");
}
cudaError_t check_device(int device, const char* call) {
    const int n = int(visible_devices().size());
    if (n == 0) return fail(cudaErrorNoDevice, format("%s: %s", call, devices_seen(n).c_str()));
    if (device < 0 || device >= n)
        return fail(cudaErrorInvalidDevice, format("%s: device %d; %s", call, device, devices_seen(n).c_str()));
    return cudaSuccess;
}
// What CUDA does at a call that needs a context: the current device's, made on first use.
cudaError_t make_context(const char* call) {
    if (g_context >= 0) return cudaSuccess;
    if (const cudaError_t e = check_device(g_current, call); e != cudaSuccess) return e;
    g_context = g_current;
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// memory: each allocation ends at an inaccessible page, freed memory is unmapped

const size_t kPage = size_t(sysconf(_SC_PAGESIZE));
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Allocation {
    char* map;
    size_t map_bytes, bytes;
};
std::map<uintptr_t, Allocation> g_device;  // by pointer (all on device g_context)
std::map<uintptr_t, size_t> g_pinned;      // cudaMallocHost: by pointer, bytes
size_t g_allocated = 0;

// The allocation of `m` holding [p, p + bytes), or null.
template <class M>
const typename M::mapped_type* find_in(const M& m, const void* p, size_t bytes) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = m.upper_bound(a);
    if (it == m.begin()) return nullptr;
    --it;
    size_t size;
    if constexpr (std::is_same_v<typename M::mapped_type, Allocation>) size = it->second.bytes;
    else size = it->second;
    return a - it->first + bytes <= size ? &it->second : nullptr;
}
bool in_device(const void* p, size_t bytes) { return find_in(g_device, p, bytes) != nullptr; }
bool in_pinned(const void* p, size_t bytes) { return find_in(g_pinned, p, bytes) != nullptr; }
// Whether p points into some device allocation (for a kernel's pointer argument: its end included).
bool device_pointer(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = g_device.upper_bound(a);
    if (it == g_device.begin()) return false;
    --it;
    return a - it->first <= it->second.bytes;
}
std::string where(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = g_device.upper_bound(a);
    if (it != g_device.begin()) {
        --it;
        if (a - it->first <= it->second.bytes + 4096)
            return format("%p (offset %zu of a %zu-byte device allocation)", p, size_t(a - it->first), it->second.bytes);
    }
    return format("%p (not device memory)", p);
}

// ---------------------------------------------------------------------------------------------
// streams and graphs: work runs at once, or is recorded while its stream captures

using Op = std::function<cudaError_t()>;
using Tape = std::vector<Op>;

}  // namespace

struct CUstream_st {
    bool capturing = false, invalidated = false;
    Tape tape;
};
struct CUevent_st {
    cudaStream_t stream = nullptr;  // where it was last recorded
};
struct CUgraph_st {
    Tape tape;
};
struct CUgraphExec_st {
    Tape tape;
};
struct cublasContext {
    cudaStream_t stream = nullptr;
};

namespace {

std::vector<cudaStream_t> g_streams;
bool valid_stream(cudaStream_t s) { return !s || std::find(g_streams.begin(), g_streams.end(), s) != g_streams.end(); }

// Runs op now, or records it when s is capturing.
cudaError_t enqueue(cudaStream_t s, Op op) {
    if (s && s->capturing) {
        s->tape.push_back(std::move(op));
        return cudaSuccess;
    }
    return op();
}

// An operation CUDA refuses inside a capture: the error, and the capture is invalidated.
cudaError_t refuse_in_capture(cudaStream_t s, const char* what) {
    s->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported, format("%s while the stream is capturing a graph", what));
}

// ---------------------------------------------------------------------------------------------
// fibers: the threads of a block

extern "C" void emu_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_entry();
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp, and
// resumes the context whose stack pointer is load_sp. (MXCSR and the x87 control word are shared:
// kernels never change rounding modes, and saving them made a switch several times slower.)
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

constexpr size_t kStackBytes = size_t(256) << 10;

enum State { kReady, kBarrier, kWarp, kDone };
enum WarpOp { kSyncwarp, kShfl, kCall };
const char* op_name(WarpOp op, ShflKind kind) {
    return op == kSyncwarp ? "__syncwarp" : op == kCall ? "a wmma operation" : kind == kShflXor ? "__shfl_xor_sync" : "__shfl_up_sync";
}

struct Fiber : Thread {
    void* sp = nullptr;
    char* stack = nullptr;  // kStackBytes above a guard page
    int index = 0, lane = 0;
    State state = kDone;
    const char* file = nullptr;  // kBarrier: the __syncthreads
    int line = 0;
    WarpOp op = kSyncwarp;  // kWarp: the operation
    ShflKind kind = kShflXor;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
    const WarpCall* call = nullptr;
};

// The launch being run.
struct Running {
    const char* name = nullptr;
    dim3 grid, block;
    size_t smem = 0;
    int threads = 0;
    const std::function<void()>* body = nullptr;
    bool failed = false;
    std::string error;
};
Running g_run;
bool g_in_kernel = false;
std::vector<Fiber> g_fibers;
void* g_sched_sp = nullptr;

// wmma loads: each warp's tile, assembled from its lanes' elements (at most 32 warps, 4-byte elements).
unsigned char g_tiles[32][256 * 4];
// The 8 elements (row * 16 + column) of a 16x16 tile that lane l reads or writes in memory: rows
// l / 4 and l / 4 + 8, columns 2 (l % 4) + {0, 1} and those + 8, as an sm_80 accumulator.
struct Ownership {
    int e[32][8];
    Ownership() {
        int k[32] = {};
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++) {
                const int l = (r % 8) * 4 + (c % 8) / 2;
                e[l][k[l]++] = r * 16 + c;
            }
    }
};
const Ownership g_own;
char* element(const WarpCall& w, int e) {
    const int r = e / 16, c = e % 16;
    const size_t at = w.col ? size_t(c) * w.ldm + r : size_t(r) * w.ldm + c;
    return static_cast<char*>(const_cast<void*>(w.ptr)) + at * w.elem;
}

// Dynamic shared memory ends at an inaccessible page; static __shared__ objects are registered.
char* g_dynamic_end = nullptr;
char* g_dynamic = nullptr;  // this launch's
std::vector<std::pair<void*, size_t>> g_static_shared;

Fiber* current() { return static_cast<Fiber*>(g_thread); }

std::string thread_name(const Fiber& f) {
    return format("thread (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z);
}
std::string context() {
    return format("kernel %s, block (%u,%u,%u)", g_run.name, g_block_idx.x, g_block_idx.y, g_block_idx.z);
}
// A fault found by the scheduler: the launch ends.
void block_fault(const std::string& message) {
    if (g_run.failed) return;
    g_run.failed = true;
    g_run.error = context() + ": " + message;
}

// A round: the fibers of one warp that were ready, in the order they run. A fiber that blocks or
// ends switches straight to the next one; the last one back to the scheduler.
Fiber* g_round[32];
int g_round_size = 0, g_round_next = 0;

void yield(Fiber* f) {
    if (!g_run.failed && g_round_next < g_round_size) {
        Fiber* next = g_round[g_round_next++];
        g_thread = next;
        emu_switch(&f->sp, next->sp);
    } else {
        emu_switch(&f->sp, g_sched_sp);
    }
}

char* map_stack(size_t bytes) {
    void* p = mmap(nullptr, bytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("cuda_emu: mmap");
        std::abort();
    }
    mprotect(p, kPage, PROT_NONE);  // overflow faults
    return static_cast<char*>(p) + kPage;
}

// A fresh context for f: its first switch "returns" into emu_fiber_entry with the stack aligned as
// at a call.
void start(Fiber& f) {
    if (!f.stack) f.stack = map_stack(kStackBytes);
    char* top = f.stack + kStackBytes - 16;  // 16-aligned: the return address slot
    uint64_t* s = reinterpret_cast<uint64_t*>(top);
    s[0] = reinterpret_cast<uint64_t>(&emu_fiber_entry);
    s[1] = 0;
    for (int i = 1; i <= 6; i++) s[-i] = 0;  // rbp rbx r12 r13 r14 r15
    f.sp = s - 6;
    f.state = kReady;
}

}  // namespace

extern "C" void emu_fiber_entry() {
    Fiber* f = current();
    (*g_run.body)();
    f->state = kDone;
    yield(f);
    __builtin_trap();  // a finished fiber is never resumed
}

namespace {

// Resolves the warp operations of the warp at `base` whose lanes have all arrived; false when none
// could be.
bool resolve_warp(int base) {
    bool released = false;
    const int n = g_run.threads;
    {
        const int lanes = std::min(32, n - base);
        // The common case first: a whole warp at one shuffle or __syncwarp with the full mask.
        Fiber* w = &g_fibers[size_t(base)];
        if (lanes == 32 && w[0].state == kWarp && w[0].mask == 0xffffffffu && w[0].op != kCall) {
            bool same = true;
            for (int j = 1; j < 32; j++)
                same &= (w[j].state == kWarp) & (w[j].mask == 0xffffffffu) & (w[j].op == w[0].op) &
                        (w[j].kind == w[0].kind) & (w[j].width == w[0].width);
            if (same) {
                if (w[0].op == kShfl) {
                    uint64_t got[32];
                    for (int j = 0; j < 32; j++) {
                        const int width = w[j].width, seg = j / width * width;
                        int src = w[j].kind == kShflXor ? j ^ w[j].arg : j - w[j].arg;
                        if (src < seg || src >= seg + width) src = j;
                        got[j] = w[src].value;
                    }
                    for (int j = 0; j < 32; j++) w[j].result = got[j];
                }
                for (int j = 0; j < 32; j++) w[j].state = kReady;
                return true;
            }
        }
        for (int l = 0; l < lanes && !g_run.failed; l++) {
            Fiber& f = g_fibers[size_t(base + l)];
            if (f.state != kWarp) continue;
            const unsigned m = f.mask;
            auto who = [&] { return thread_name(f) + " at " + op_name(f.op, f.kind) + format(" (mask 0x%08x)", m); };
            bool all = true;
            for (int j = 0; j < 32 && !g_run.failed; j++) {
                if (!(m >> j & 1)) continue;
                if (j >= lanes) {
                    block_fault(format("%s: the mask names lane %d, which does not exist (%d threads in the block)",
                                       who().c_str(), j, n));
                    break;
                }
                const Fiber& g = g_fibers[size_t(base + j)];
                if (g.state == kDone) {
                    block_fault(format("%s: the mask names lane %d (%s), which has exited", who().c_str(), j,
                                       thread_name(g).c_str()));
                } else if (g.state == kBarrier) {
                    block_fault(format("%s waits for lane %d (%s), which waits at __syncthreads (%s:%d): deadlock",
                                       who().c_str(), j, thread_name(g).c_str(), g.file, g.line));
                } else if (g.state == kReady) {
                    all = false;
                } else if (g.mask != m || g.op != f.op || (f.op == kShfl && (g.kind != f.kind || g.width != f.width)) ||
                           (f.op == kCall && (g.call->kind != f.call->kind || g.call->elem != f.call->elem ||
                                            std::strcmp(g.call->what, f.call->what)))) {
                    block_fault(format("%s meets lane %d (%s) at %s (mask 0x%08x): lanes named in a mask must run the "
                                       "same operation with the same mask",
                                       who().c_str(), j, thread_name(g).c_str(),
                                       g.op == kCall ? g.call->what : op_name(g.op, g.kind), g.mask));
                }
            }
            if (g_run.failed || !all) continue;

            if (f.op == kShfl) {
                uint64_t got[32];
                for (int j = 0; j < lanes; j++) {
                    if (!(m >> j & 1)) continue;
                    const Fiber& g = g_fibers[size_t(base + j)];
                    const int seg = j / g.width * g.width;
                    int src = g.kind == kShflXor ? j ^ g.arg : j - g.arg;
                    if (src < seg || src >= seg + g.width) src = j;  // outside its segment: its own value
                    if (!(m >> src & 1)) {
                        block_fault(format("%s: lane %d reads lane %d, which is not in the mask (undefined)",
                                           who().c_str(), j, src));
                        return false;
                    }
                    got[j] = g_fibers[size_t(base + src)].value;
                }
                for (int j = 0; j < lanes; j++)
                    if (m >> j & 1) g_fibers[size_t(base + j)].result = got[j];
            } else if (f.op == kCall) {
                const WarpCall& c0 = *g_fibers[size_t(base)].call;
                for (int j = 1; j < 32 && !g_run.failed; j++) {
                    const WarpCall& c = *g_fibers[size_t(base + j)].call;
                    if (c.ptr != c0.ptr || c.ldm != c0.ldm || c.col != c0.col)
                        block_fault(format("%s: lane %d passes pointer %p, ldm %u; lane 0 %p, ldm %u (they must be the "
                                           "same in every lane)",
                                           c0.what, j, c.ptr, c.ldm, c0.ptr, c0.ldm));
                    for (int k = 0; k < 3 && !g_run.failed; k++)
                        if (c0.in[k] && std::memcmp(c.in[k], c0.in[k], c0.in_bytes[k]) != 0)
                            block_fault(format("%s: lane %d's fragment (operand %d) differs from lane 0's; the emulator "
                                               "keeps the whole tile in every lane, so lanes must change their "
                                               "fragments alike",
                                               c0.what, j, k + 1));
                }
                if (g_run.failed) return false;
                if (c0.kind == WarpCall::kMma) c0.run(c0);
                const void* result = c0.kind == WarpCall::kLoad ? static_cast<const void*>(g_tiles[base / 32]) : c0.out;
                for (int j = 0; j < 32; j++) {
                    const WarpCall& c = *g_fibers[size_t(base + j)].call;
                    if (c.out && c.out != result) std::memcpy(c.out, result, c.out_bytes);
                }
            }
            for (int j = 0; j < lanes; j++)
                if (m >> j & 1) g_fibers[size_t(base + j)].state = kReady;
            released = true;
        }
    }
    return released;
}

// Runs the warp at `base` until each of its threads waits at __syncthreads or has exited; false
// after a fault. Rounds alternate the lane order.
bool run_warp(int base, bool forward) {
    const int lanes = std::min(32, g_run.threads - base);
    for (;; forward = !forward) {
        g_round_size = g_round_next = 0;
        for (int k = 0; k < lanes; k++) {
            Fiber& f = g_fibers[size_t(base + (forward ? k : lanes - 1 - k))];
            if (f.state == kReady) g_round[g_round_size++] = &f;
        }
        if (g_round_size > 0) {
            Fiber* first = g_round[g_round_next++];
            g_thread = first;
            emu_switch(&g_sched_sp, first->sp);
            g_thread = nullptr;
            if (g_run.failed) return false;
        }
        if (!resolve_warp(base)) return !g_run.failed;
    }
}

// Runs one block to its end, warp after warp between barriers (ascending, then descending order);
// false after a fault (g_run.error).
bool run_block() {
    const int n = g_run.threads, warps = (n + 31) / 32;
    for (auto [p, bytes] : g_static_shared) std::memset(p, 0xff, bytes);
    std::memset(g_dynamic, 0xff, g_run.smem);
    const dim3 b = g_run.block;
    uint3 t{0, 0, 0};  // x fastest, then y, then z, as CUDA numbers a block's threads
    for (int i = 0; i < n; i++) {
        Fiber& f = g_fibers[size_t(i)];
        f.index = i, f.lane = i % 32, f.tid = t;
        start(f);
        if (++t.x == b.x) t.x = 0, t.y == b.y - 1 ? (t.y = 0, t.z++) : t.y++;
    }
    for (bool forward = true;; forward = !forward) {
        for (int k = 0; k < warps; k++)
            if (!run_warp(32 * (forward ? k : warps - 1 - k), forward)) return false;
        const Fiber* first = nullptr;
        for (int i = 0; i < n; i++) {
            const Fiber& f = g_fibers[size_t(i)];
            if (f.state == kDone) continue;
            if (f.state != kBarrier) {  // resolve_warp names every stuck warp operation; a safety net
                block_fault(format("%s is stuck at %s: deadlock", thread_name(f).c_str(), op_name(f.op, f.kind)));
                return false;
            }
            if (!first) {
                first = &f;
            } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
                block_fault(format("threads wait at different __syncthreads: %s at %s:%d, %s at %s:%d (deadlock)",
                                   thread_name(*first).c_str(), first->file, first->line, thread_name(f).c_str(), f.file,
                                   f.line));
                return false;
            }
        }
        if (!first) return true;  // every thread has exited
        for (int i = 0; i < n; i++)
            if (g_fibers[size_t(i)].state == kBarrier) g_fibers[size_t(i)].state = kReady;
    }
}

// The SIGSEGV/SIGBUS handler while a kernel runs: names the kernel and thread, then lets the
// previous handler (doctest's) report the crash.
struct sigaction g_old_segv, g_old_bus;
void on_fault(int sig, siginfo_t* info, void*) {
    if (g_in_kernel) {
        const Fiber* f = current();
        std::string m = format("cuda_emu: %s at %s in %s, %s\n", sig == SIGSEGV ? "segmentation fault" : "bus error",
                               where(info->si_addr).c_str(), context().c_str(),
                               f ? thread_name(*f).c_str() : "(a warp operation)");
        if (write(2, m.data(), m.size()) < 0) {
        }
    }
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
}
void install_fault_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    stack_t ss;
    if (sigaltstack(nullptr, &ss) == 0 && (ss.ss_flags & SS_DISABLE)) {  // a fiber's overflow needs one
        static std::vector<char> alt(size_t(64) << 10);
        ss.ss_sp = alt.data(), ss.ss_size = alt.size(), ss.ss_flags = 0;
        sigaltstack(&ss, nullptr);
    }
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

cudaError_t run_kernel(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    if (g_in_kernel) return fail(cudaErrorLaunchFailure, "a launch from inside a kernel");
    install_fault_handler();
    g_run = Running{};
    g_run.name = name, g_run.grid = grid, g_run.block = block, g_run.smem = smem, g_run.body = &body;
    g_run.threads = int(block.x * block.y * block.z);
    if (g_fibers.size() < size_t(g_run.threads)) g_fibers.resize(size_t(g_run.threads));
    if (!g_dynamic_end) {  // kSharedOptin bytes, then an inaccessible page
        char* m = map_stack(kSharedOptin + kPage);
        g_dynamic_end = m + kSharedOptin;
        mprotect(g_dynamic_end, kPage, PROT_NONE);
    }
    g_dynamic = g_dynamic_end - round_up(smem, 128);
    g_block_dim = block, g_grid_dim = grid;
    g_in_kernel = true;
    const size_t blocks = size_t(grid.x) * grid.y * grid.z;
    bool ok = true;
    for (size_t i = blocks; i-- > 0 && ok;) {
        g_block_idx = uint3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / (size_t(grid.x) * grid.y))};
        ok = run_block();
    }
    g_in_kernel = false;
    g_thread = nullptr;
    if (!ok) return fail(cudaErrorLaunchFailure, g_run.error);
    return cudaSuccess;
}

std::map<const void*, size_t> g_smem_limit;  // cudaFuncAttributeMaxDynamicSharedMemorySize by kernel

}  // namespace

// ---------------------------------------------------------------------------------------------
// device-side entry points (cuda_runtime.h)

namespace emu::detail {

void fault(const char* format, ...) {
    va_list ap;
    va_start(ap, format);
    const std::string m = vformat(format, ap);
    va_end(ap);
    Fiber* f = current();
    if (!g_in_kernel || !f) {
        std::fprintf(stderr, "cuda_emu: %s (outside a kernel's thread)\n", m.c_str());
        std::abort();
    }
    if (!g_run.failed) g_run.failed = true, g_run.error = context() + ", " + thread_name(*f) + ": " + m;
    f->state = kDone;
    yield(f);
    __builtin_trap();
}

void syncthreads(const char* file, int line) {
    Fiber* f = current();
    if (!f) fault("__syncthreads outside a kernel");
    f->state = kBarrier, f->file = file, f->line = line;
    yield(f);
}

static uint64_t warp_op(WarpOp op, ShflKind kind, unsigned mask, uint64_t bits, int arg, int width, const WarpCall* call) {
    Fiber* f = current();
    if (!f) fault("a warp operation outside a kernel");
    if (!(mask >> f->lane & 1))
        fault("%s with mask 0x%08x, which does not name the calling lane %d", op == kCall ? call->what : op_name(op, kind),
              mask, f->lane);
    f->state = kWarp, f->op = op, f->kind = kind, f->mask = mask, f->value = bits, f->arg = arg, f->width = width;
    f->call = call;
    yield(f);
    return f->result;
}

uint64_t shfl(ShflKind kind, unsigned mask, uint64_t bits, int arg, int width) {
    if (width < 1 || width > 32 || (width & (width - 1))) fault("shuffle width %d: a power of two up to 32", width);
    return warp_op(kShfl, kind, mask, bits, arg, width, nullptr);
}
void syncwarp(unsigned mask) { warp_op(kSyncwarp, kShflXor, mask, 0, 0, 32, nullptr); }
void warp_call(const WarpCall& call) {
    Fiber* f = current();
    if (!f) fault("%s outside a kernel", call.what);
    const int lane = f->lane;
    if (call.kind == WarpCall::kLoad)  // this lane's elements, read now
        for (int e : g_own.e[lane]) std::memcpy(g_tiles[f->index / 32] + size_t(e) * call.elem, element(call, e), call.elem);
    warp_op(kCall, kShflXor, 0xffffffffu, 0, 0, 32, &call);
    if (call.kind == WarpCall::kStore)  // this lane's elements, written as it leaves
        for (int e : g_own.e[lane])
            std::memcpy(element(call, e), static_cast<const char*>(call.in[0]) + size_t(e) * call.elem, call.elem);
}

void* dynamic_shared() {
    if (!g_in_kernel) fault("dynamic shared memory outside a kernel");
    return g_dynamic;
}
void register_shared(void* p, size_t bytes) {
    g_static_shared.push_back({p, bytes});
    std::memset(p, 0xff, bytes);
}

bool in_device_memory(const void* p, size_t bytes) { return in_device(p, bytes); }

bool check_pointer_argument(const char* kernel, int index, const void* p) {
    if (!p || device_pointer(p)) return true;
    fail(cudaErrorInvalidValue, format("launch of %s: argument %d is %s", kernel, index + 1, where(p).c_str()));
    return false;
}

cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute attr, int value) {
    if (const cudaError_t e = make_context("cudaFuncSetAttribute"); e != cudaSuccess) return e;
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > kSharedOptin)
        return fail(cudaErrorInvalidValue,
                    format("cudaFuncSetAttribute: dynamic shared memory %d bytes (the device allows %zu)", value, kSharedOptin));
    g_smem_limit[fn] = size_t(value);
    return cudaSuccess;
}

void submit(const LaunchConfig& c, const char* name, int max_threads, const void* fn, std::function<void()> body) {
    const dim3 g = c.grid, b = c.block;
    const size_t threads = size_t(b.x) * b.y * b.z;
    const auto lim = g_smem_limit.find(fn);
    const size_t smem_limit = lim == g_smem_limit.end() ? kSharedDefault : lim->second;
    cudaError_t e = cudaSuccess;
    std::string why;
    if (!valid_stream(c.stream)) {
        e = cudaErrorInvalidResourceHandle, why = "not a stream";
    } else if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z) {
        e = cudaErrorInvalidConfiguration, why = "a grid or block dimension of 0";
    } else if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > size_t(kMaxThreads)) {
        e = cudaErrorInvalidConfiguration, why = format("%zu threads per block (at most 1024)", threads);
    } else if (threads > size_t(max_threads)) {
        e = cudaErrorLaunchOutOfResources, why = format("%zu threads per block, over its __launch_bounds__ of %d", threads, max_threads);
    } else if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
        e = cudaErrorInvalidConfiguration, why = format("grid (%u, %u, %u): y and z at most 65535", g.x, g.y, g.z);
    } else if (c.smem > smem_limit) {
        e = cudaErrorInvalidValue, why = format("%zu bytes of dynamic shared memory, over the kernel's limit of %zu%s", c.smem,
                                                smem_limit, lim == g_smem_limit.end() ? " (no cudaFuncSetAttribute)" : "");
    }
    if (e != cudaSuccess) {
        if (c.stream && c.stream->capturing) c.stream->invalidated = true;
        fail(e, format("launch of %s <<<(%u,%u,%u), (%u,%u,%u), %zu>>>: %s", name, g.x, g.y, g.z, b.x, b.y, b.z, c.smem,
                       why.c_str()));
        return;
    }
    if (e = make_context("a kernel launch"); e != cudaSuccess) return;
    const size_t smem = c.smem;
    e = enqueue(c.stream, [=] { return run_kernel(name, g, b, smem, body); });
    if (e != cudaSuccess) g_last_error = e;
}

}  // namespace emu::detail

// ---------------------------------------------------------------------------------------------
// the runtime API

cudaError_t cudaGetDeviceCount(int* count) {
    *count = int(visible_devices().size());
    if (*count == 0) return fail(cudaErrorNoDevice, format("cudaGetDeviceCount: %s", devices_seen(0).c_str()));
    return cudaSuccess;
}
// Makes the device's context at once (as CUDA 12 does).
cudaError_t cudaSetDevice(int device) {
    if (const cudaError_t e = check_device(device, "cudaSetDevice"); e != cudaSuccess) return e;
    if (g_context >= 0 && device != g_context)
        return fail(cudaErrorInvalidDevice,
                    format("cudaSetDevice(%d): this process already drives device %d; the emulator runs one device per "
                           "process", device, g_context));
    g_current = g_context = device;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
    *device = g_current;
    return cudaSuccess;
}
// "domain:bus:device.function" as CUDA writes it; the bus is 0x10 plus the device's index among all
// emulated devices, so a device seen under two ordinals (CUDA_VISIBLE_DEVICES) keeps its address.
cudaError_t cudaDeviceGetPCIBusId(char* bus_id, int len, int device) {
    if (const cudaError_t e = check_device(device, "cudaDeviceGetPCIBusId"); e != cudaSuccess) return e;
    const std::string id = format("0000:%02X:00.0", 0x10 + visible_devices()[size_t(device)]);
    if (!bus_id || len < int(id.size()) + 1)
        return fail(cudaErrorInvalidValue, format("cudaDeviceGetPCIBusId: %d bytes for a %zu-character id", len, id.size()));
    std::memcpy(bus_id, id.c_str(), id.size() + 1);
    return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
    if (!a) return fail(cudaErrorInvalidValue, "cudaPointerGetAttributes: no attributes to write");
    void* q = const_cast<void*>(p);
    if (in_device(p, 1)) *a = cudaPointerAttributes{cudaMemoryTypeDevice, g_context, q, nullptr};
    else if (in_pinned(p, 1)) *a = cudaPointerAttributes{cudaMemoryTypeHost, g_context, q, q};
    else *a = cudaPointerAttributes{cudaMemoryTypeUnregistered, -2, nullptr, q};
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (const cudaError_t e = check_device(device, "cudaGetDeviceProperties"); e != cudaSuccess) return e;
    *prop = cudaDeviceProp{};
    std::snprintf(prop->name, sizeof prop->name, "cuda_emu (CPU emulation)");
    prop->totalGlobalMem = kTotalMemory;
    prop->sharedMemPerBlock = kSharedDefault;
    prop->sharedMemPerBlockOptin = kSharedOptin;
    prop->maxThreadsPerBlock = kMaxThreads;
    prop->multiProcessorCount = kSMs;
    prop->major = 9, prop->minor = 0;
    return cudaSuccess;
}
cudaError_t cudaGetLastError() {
    const cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}
const char* cudaGetErrorString(cudaError_t e) {
    auto it = g_messages.find(int(e));
    return it != g_messages.end() ? it->second.c_str() : error_name(e);
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
    *p = nullptr;
    if (const cudaError_t e = make_context("cudaMalloc"); e != cudaSuccess) return e;
    if (bytes == 0) return cudaSuccess;
    if (bytes > kTotalMemory - g_allocated)
        return fail(cudaErrorMemoryAllocation, format("cudaMalloc of %zu bytes with %zu free", bytes, kTotalMemory - g_allocated));
    const size_t used = round_up(bytes, 256), data = round_up(used, kPage), total = data + 2 * kPage;
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation, format("mmap of %zu bytes failed", total));
    char* map = static_cast<char*>(m);
    mprotect(map, kPage, PROT_NONE);
    mprotect(map + kPage + data, kPage, PROT_NONE);
    char* ptr = map + kPage + data - used;
    std::memset(ptr, 0xff, bytes);  // uninitialised memory: NaN floats, -1 ints
    g_device[reinterpret_cast<uintptr_t>(ptr)] = Allocation{map, total, bytes};
    g_allocated += bytes;
    *p = ptr;
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
    if (const cudaError_t e = make_context("cudaMallocHost"); e != cudaSuccess) return e;
    *p = std::aligned_alloc(256, round_up(std::max<size_t>(bytes, 1), 256));
    if (!*p) return fail(cudaErrorMemoryAllocation, format("cudaMallocHost of %zu bytes", bytes));
    g_pinned[reinterpret_cast<uintptr_t>(*p)] = bytes;
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    auto it = g_device.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_device.end()) return fail(cudaErrorInvalidValue, format("cudaFree of %s", where(p).c_str()));
    g_allocated -= it->second.bytes;
    munmap(it->second.map, it->second.map_bytes);
    g_device.erase(it);
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
    if (const cudaError_t e = make_context("cudaMemGetInfo"); e != cudaSuccess) return e;
    *free = kTotalMemory - g_allocated, *total = kTotalMemory;
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: not a stream");
    if (bytes == 0) return cudaSuccess;
    const bool to_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool from_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind == cudaMemcpyHostToHost || !(kind >= 1 && kind <= 3))
        return fail(cudaErrorInvalidValue, format("cudaMemcpyAsync: copy kind %d", int(kind)));
    if (to_device != in_device(dst, bytes) || from_device != in_device(src, bytes))
        return fail(cudaErrorInvalidValue, format("cudaMemcpyAsync of %zu bytes, kind %d: destination %s, source %s", bytes,
                                                  int(kind), where(dst).c_str(), where(src).c_str()));
    if (s && s->capturing && kind != cudaMemcpyDeviceToDevice) {
        const void* host = kind == cudaMemcpyHostToDevice ? src : dst;
        if (!in_pinned(host, bytes)) return refuse_in_capture(s, "a copy to or from pageable host memory");
    }
    return enqueue(s, [=] {
        std::memmove(dst, src, bytes);
        return cudaSuccess;
    });
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync: not a stream");
    if (bytes == 0) return cudaSuccess;
    if (!in_device(p, bytes))
        return fail(cudaErrorInvalidValue, format("cudaMemsetAsync of %zu bytes at %s", bytes, where(p).c_str()));
    return enqueue(s, [=] {
        std::memset(p, value, bytes);
        return cudaSuccess;
    });
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
    if (const cudaError_t e = make_context("cudaStreamCreateWithFlags"); e != cudaSuccess) return e;
    *s = new CUstream_st;
    g_streams.push_back(*s);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: not a stream");
    if (s && s->capturing) return refuse_in_capture(s, "cudaStreamSynchronize");
    return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
    if (!valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamIsCapturing: not a stream");
    *status = !s || !s->capturing ? cudaStreamCaptureStatusNone
              : s->invalidated    ? cudaStreamCaptureStatusInvalidated
                                  : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
    if (const cudaError_t err = make_context("cudaEventCreateWithFlags"); err != cudaSuccess) return err;
    *e = new CUevent_st;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (!e || !valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: not an event or stream");
    e->stream = s;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!e) return fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: not an event");
    if (e->stream && e->stream->capturing) return refuse_in_capture(e->stream, "cudaEventSynchronize");
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (!s || !valid_stream(s)) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamBeginCapture on the legacy stream");
    if (s->capturing) return fail(cudaErrorIllegalState, "cudaStreamBeginCapture: the stream is capturing already");
    s->capturing = true, s->invalidated = false;
    s->tape.clear();
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
    *g = nullptr;
    if (!s || !valid_stream(s) || !s->capturing)
        return fail(cudaErrorIllegalState, "cudaStreamEndCapture: the stream is not capturing");
    s->capturing = false;
    Tape tape = std::move(s->tape);
    s->tape.clear();
    if (s->invalidated) return fail(cudaErrorStreamCaptureInvalidated, "the capture was invalidated by an earlier error");
    *g = new CUgraph_st{std::move(tape)};
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long) {
    if (!g) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate: no graph");
    *exec = new CUgraphExec_st{g->tape};
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    if (!exec || !valid_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaGraphLaunch: not a graph or stream");
    return enqueue(s, [exec] {
        for (const Op& op : exec->tape)
            if (const cudaError_t e = op(); e != cudaSuccess) return e;
        return cudaSuccess;
    });
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    delete exec;
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// cuBLAS

namespace {
std::map<int, std::string> g_blas_messages;
cublasStatus_t blas_fail(cublasStatus_t s, const std::string& message) {
    g_blas_messages[int(s)] = "cuda_emu cuBLAS: " + message;
    return s;
}
size_t type_size(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }
float load_as_float(const void* p, cudaDataType t, size_t i) {
    if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
    if (t == CUDA_R_16F) return __half2float(static_cast<const __half*>(p)[i]);
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
    if (make_context("cublasCreate") != cudaSuccess) return CUBLAS_STATUS_NOT_INITIALIZED;
    *handle = new cublasContext;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!valid_stream(stream)) return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetStream: not a stream");
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void* workspace, size_t bytes) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes && !in_device(workspace, bytes))
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace: the workspace is not device memory");
    return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusString(cublasStatus_t s) {
    auto it = g_blas_messages.find(int(s));
    if (it != g_blas_messages.end()) return it->second.c_str();
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "unknown cuBLAS status";
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool ta = transa == CUBLAS_OP_T, tb = transb == CUBLAS_OP_T;
    if ((transa != CUBLAS_OP_N && !ta) || (transb != CUBLAS_OP_N && !tb) || m < 0 || n < 0 || k < 0 ||
        lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m))
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE,
                         format("cublasGemmEx: m %d n %d k %d, op(A) %s lda %d, op(B) %s ldb %d, ldc %d", m, n, k,
                                ta ? "T" : "N", lda, tb ? "T" : "N", ldb, ldc));
    const bool types_ok = compute == CUBLAS_COMPUTE_32F && Atype == Btype &&
                          (Atype == CUDA_R_32F ? Ctype == CUDA_R_32F : Ctype == CUDA_R_32F || Ctype == Atype);
    if (!types_ok)
        return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED,
                         format("cublasGemmEx: A type %d, B type %d, C type %d, compute %d", int(Atype), int(Btype),
                                int(Ctype), int(compute)));
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    // The bytes each operand spans, column-major: cols columns of ld elements, the last one rows long.
    auto spans = [](const void* p, cudaDataType t, int rows, int cols, int ld) {
        return rows == 0 || cols == 0 || in_device(p, (size_t(cols - 1) * ld + rows) * type_size(t));
    };
    if (!spans(A, Atype, ta ? k : m, ta ? m : k, lda) || !spans(B, Btype, tb ? n : k, tb ? k : n, ldb) ||
        !spans(C, Ctype, m, n, ldc))
        return blas_fail(CUBLAS_STATUS_EXECUTION_FAILED,
                         format("cublasGemmEx: an operand is not inside one device allocation (A %s, B %s, C %s)",
                                where(A).c_str(), where(B).c_str(), where(C).c_str()));
    const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
    const cudaError_t e = enqueue(handle->stream, [=] {
        // op(A) as rows [m][k], op(B) as columns [n][k]: each output a dot product of two rows.
        std::vector<float> ar(size_t(m) * k), bc(size_t(n) * k);
        for (int i = 0; i < m; i++)
            for (int l = 0; l < k; l++) ar[size_t(i) * k + l] = load_as_float(A, Atype, ta ? size_t(i) * lda + l : size_t(l) * lda + i);
        for (int j = 0; j < n; j++)
            for (int l = 0; l < k; l++) bc[size_t(j) * k + l] = load_as_float(B, Btype, tb ? size_t(l) * ldb + j : size_t(j) * ldb + l);
#pragma omp parallel for schedule(static) if (double(m) * n * k > 1e6)
        for (int j = 0; j < n; j++) {
            for (int i = 0; i < m; i++) {
                const float* x = &ar[size_t(i) * k];
                const float* y = &bc[size_t(j) * k];
                double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int l = 0;
                for (; l + 8 <= k; l += 8)
                    for (int u = 0; u < 8; u++) acc[u] += double(x[l + u]) * double(y[l + u]);
                for (; l < k; l++) acc[0] += double(x[l]) * double(y[l]);
                const double dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                const size_t at = size_t(j) * ldc + i;
                double v = double(a) * dot;
                if (b != 0.0f) v += double(b) * load_as_float(C, Ctype, at);
                if (Ctype == CUDA_R_32F) static_cast<float*>(C)[at] = float(v);
                else if (Ctype == CUDA_R_16F) static_cast<__half*>(C)[at] = __float2half_rn(float(v));
                else static_cast<__nv_bfloat16*>(C)[at] = __float2bfloat16_rn(float(v));
            }
        }
        return cudaSuccess;
    });
    if (e != cudaSuccess) return blas_fail(CUBLAS_STATUS_EXECUTION_FAILED, cudaGetErrorString(e));
    return CUBLAS_STATUS_SUCCESS;
}
