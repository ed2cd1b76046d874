// common.cpp: small helpers declared in common.h.
#include "common.h"

#include <chrono>

double now_seconds() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

bool well_formed_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        const unsigned char b = static_cast<unsigned char>(s[i]);
        const size_t len = b < 0x80 ? 1 : b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3
                         : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
        if (len == 0 || i + len > s.size()) return false;
        // The second byte's range excludes overlongs and surrogates (Unicode Table 3-7).
        const unsigned char lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
        const unsigned char hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
        for (size_t n = 1; n < len; n++) {
            const unsigned char c = static_cast<unsigned char>(s[i + n]);
            if (c < (n == 1 ? lo : 0x80) || c > (n == 1 ? hi : 0xBF)) return false;
        }
        i += len;
    }
    return true;
}
