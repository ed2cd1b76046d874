// common.h: the error type for bad user input, and small helpers every file uses.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>

// Bad input (a file, a flag, a tensor) throws Error; main() prints "error: <what>" and exits 1.
// Broken internal invariants use assert; library failures use the CHECK macros of their backend.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// printf-style message builder, so errors can name the file, tensor and value in one line.
template <typename... Args>
std::string fmt(const char* format, Args... args) {
    int n = std::snprintf(nullptr, 0, format, args...);
    std::string s(size_t(n) + 1, '\0');
    std::snprintf(s.data(), s.size(), format, args...);
    s.resize(size_t(n));
    return s;
}
inline std::string fmt(const char* s) { return s; }

// A nlohmann::json::parse callback refusing nesting deeper than kMaxJsonDepth: the library parses
// any depth, but dump() (which error messages use to quote a value) recurses once per level, so a
// line of a million '[' overflowed the stack. No config, header or tokenizer nests beyond a few.
// `where` prefixes the message ("" for none).
constexpr int kMaxJsonDepth = 128;
struct JsonDepthLimit {
    std::string where;
    template <typename Event, typename Json>
    bool operator()(int depth, Event, Json&) const {
        if (depth > kMaxJsonDepth)
            throw Error(fmt("%s%sJSON nested deeper than %d levels", where.c_str(), where.empty() ? "" : ": ",
                            kMaxJsonDepth));
        return true;
    }
};

// Seconds since an arbitrary start, monotonic; for the stats lines.
double now_seconds();

// Whether s is well-formed UTF-8 (no overlongs, surrogates or stray bytes): what a string must be
// to go into JSON (tokenizer.json, model.bin's header), which nlohmann::json refuses otherwise.
bool well_formed_utf8(const std::string& s);
