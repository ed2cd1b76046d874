// common.cpp: small helpers declared in common.h.
#include "common.h"

#include <chrono>

double now_seconds() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}
