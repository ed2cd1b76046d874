// bpe.cpp: byte-level BPE: PCRE2 pre-tokenizer regexes, GPT-2's byte-to-character table, the two
// file formats (Hugging Face tokenizer.json, Llama 3 tiktoken) and rank-ordered merging.
#include "bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <string_view>

#include "common.h"

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Regex: PCRE2 in UTF + UCP mode, so \p{L}, \p{N} and \s mean their Unicode categories as in the
// Rust regex engines behind tokenizers and tiktoken. MATCH_INVALID_UTF: invalid UTF-8 never
// matches, so it ends up between matches, where splitting keeps it as a piece of its own.

class Regex {
  public:
    Regex(const std::string& pattern, bool literal, const std::string& where) {
        int err = 0;
        PCRE2_SIZE at = 0;
        // (PCRE2 refuses UCP with LITERAL, and a literal needs no character classes.)
        uint32_t opts = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
        code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &at, nullptr);
        if (!code_) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(err, msg, sizeof msg);
            throw Error(fmt("%s: pre-tokenizer regex '%s': %s at offset %zu", where.c_str(), pattern.c_str(),
                            reinterpret_cast<const char*>(msg), size_t(at)));
        }
        // JIT is several times faster; where the library lacks it the interpreter gives the same matches.
        pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
    }
    ~Regex() { pcre2_code_free(code_); }
    Regex(const Regex&) = delete;
    Regex& operator=(const Regex&) = delete;

    // Calls piece(begin, end) for each non-empty match of s and each non-empty stretch between
    // matches, in order (tokenizers' Split "Isolated"). An empty match splits nothing off but
    // still ends the stretch before it, as in tokenizers.
    template <typename F>
    void split(std::string_view s, pcre2_match_data* md, F&& piece) const {
        size_t last = 0, from = 0;
        while (from < s.size()) {
            int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), from, 0, md, nullptr);
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof msg);
                throw Error(fmt("tokenizer: pre-tokenizer regex failed on a %zu-byte piece: %s", s.size(),
                                reinterpret_cast<const char*>(msg)));
            }
            const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
            const size_t b = ov[0], e = ov[1];
            if (b > last) piece(last, b);
            if (e > b) piece(b, e);
            last = b;
            if (e > b) {
                last = from = e;
            } else {  // empty: look again one character on (a UTF-8 lead byte says how far)
                from = b + 1;
                while (from < s.size() && (uint8_t(s[from]) & 0xC0) == 0x80) from++;
            }
        }
        if (s.size() > last) piece(last, s.size());
    }
    pcre2_code* code() const { return code_; }

  private:
    pcre2_code* code_ = nullptr;
};

namespace {

const char kGpt2Pattern[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char kLlama3Pattern[] = R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3})"
                              R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// GPT-2's bytes_to_unicode: vocabularies are written as printable text, each byte one character.
// Printable Latin-1 bytes stand for themselves; the rest (controls, space, 0x7F-0xA0, 0xAD) for
// code points 256, 257, ... in byte order (so space is U+0120 'Ġ', newline U+010A 'Ċ').

struct ByteTable {
    int byte_of[324];  // code point -> byte, -1 for code points that stand for none
    ByteTable() {
        std::fill(std::begin(byte_of), std::end(byte_of), -1);
        int n = 0;
        for (int b = 0; b < 256; b++) {
            bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            byte_of[printable ? b : 256 + n++] = b;
        }
    }
};
const ByteTable& byte_table() {
    static const ByteTable t;  // built once (thread-safe static initialization)
    return t;
}

// The code point at s[i] and its length in bytes, or -1 when s[i] starts no valid UTF-8 character.
int utf8_at(const std::string& s, size_t i, int* len) {
    unsigned char b = s[i];
    int n = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return -1;
    int cp = n == 1 ? b : b & (0x7F >> n);
    for (int k = 1; k < n; k++) {
        unsigned char c = s[i + k];
        if ((c & 0xC0) != 0x80) return -1;
        cp = cp << 6 | (c & 0x3F);
    }
    *len = n;
    return cp;
}

// A vocabulary entry's bytes. Like tokenizers' ByteLevel decoder, an entry with a character
// outside the table (an odd hand-added token) stands for its own UTF-8 bytes.
std::string byte_level_decode(const std::string& token) {
    const ByteTable& t = byte_table();
    std::string out;
    for (size_t i = 0; i < token.size();) {
        int len = 0, cp = utf8_at(token, i, &len);
        if (cp < 0 || cp >= 324 || t.byte_of[cp] < 0) return token;
        out += char(t.byte_of[cp]);
        i += size_t(len);
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// JSON helpers: every message names the file and the field.

const json* member(const json& j, const char* key) {  // null when absent or JSON null
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
}

std::string type_of(const json& j, const std::string& where, const char* what) {
    const json* t = j.is_object() ? member(j, "type") : nullptr;
    if (!t || !t->is_string())
        throw Error(fmt("%s: %s has no \"type\": %.200s", where.c_str(), what, j.dump().c_str()));
    return t->get<std::string>();
}

bool flag(const json& j, const char* key, bool fallback, const std::string& where) {
    const json* v = member(j, key);
    if (!v) return fallback;
    if (!v->is_boolean())
        throw Error(fmt("%s: \"%s\" must be true or false, found %s", where.c_str(), key, v->dump().c_str()));
    return v->get<bool>();
}

constexpr int64_t kMaxVocab = 1 << 24;  // far above any real vocabulary; refuses absurd ids early

int token_id(const json& v, const std::string& where) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxVocab)
        throw Error(fmt("%s: token id %s is not an integer in [0, %lld)", where.c_str(), v.dump().c_str(),
                        (long long)kMaxVocab));
    return int(v.get<int64_t>());
}

// Meta's Llama 3 special tokens, in id order after the base vocabulary (llama-models' tokenizer.py,
// Llama 3.1 and later; Llama 3.0 named 128002-128005, 128008, 128010 and 128011 reserved tokens,
// the ids of BOS, EOS, the header tokens and <|eot_id|> are the same).
std::vector<std::string> llama3_special_tokens() {
    std::vector<std::string> t = {"<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                  "<|python_tag|>", "<|image|>"};
    for (int i = 2; t.size() < 256; i++) t.push_back(fmt("<|reserved_special_token_%d|>", i));
    return t;
}

// Strict base64 (standard alphabet, '=' padding only at the end); false for anything else.
bool base64_decode(std::string_view s, std::string& out) {
    out.clear();
    if (s.empty() || s.size() % 4 != 0) return false;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < s.size(); i++) {
        char c = s[i];
        int v = c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26
              : c >= '0' && c <= '9' ? c - '0' + 52 : c == '+' ? 62 : c == '/' ? 63 : -1;
        if (c == '=') {  // one or two, only as the last characters
            size_t pad = s.size() - i;
            if (pad > 2 || s.find_first_not_of('=', i) != std::string_view::npos) return false;
            return (acc & ((1u << bits) - 1)) == 0;  // the dropped bits must be zero
        }
        if (v < 0) return false;
        acc = acc << 6 | uint32_t(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out += char((acc >> bits) & 0xFF);
        }
    }
    return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Loading

Bpe::Bpe() { std::fill(std::begin(byte_id_), std::end(byte_id_), -1); }
Bpe::Bpe(Bpe&&) noexcept = default;
Bpe::~Bpe() = default;

int Bpe::special_id(const std::string& content) const {
    for (const Added& a : added_)
        if (a.content == content) return a.id;
    return -1;
}

void Bpe::finish(const std::string& where) {
    for (int b = 0; b < 256; b++) {  // -1 for a byte without a token (merge() drops it, or makes it unk)
        auto it = ids_.find(std::string(1, char(b)));
        byte_id_[b] = it == ids_.end() ? -1 : it->second;
    }
    // Longest first, so that of two added tokens starting at one place the longer wins (as the
    // leftmost-longest matching of tokenizers and tiktoken).
    std::stable_sort(added_.begin(), added_.end(),
                     [](const Added& a, const Added& b) { return a.content.size() > b.content.size(); });
    for (const Added& a : added_) added_first_byte_[uint8_t(a.content[0])] = true;
    // A known start/end token when the file does not say (bos_id/eos_id may be set already).
    auto first_of = [&](std::initializer_list<const char*> names) {
        for (const char* n : names) {
            int id = special_id(n);
            if (id < 0) {
                auto it = ids_.find(n);
                if (it != ids_.end()) id = it->second;
            }
            if (id >= 0) return id;
        }
        return -1;
    };
    if (bos_id < 0) bos_id = first_of({"<|begin_of_text|>", "<s>", "<|endoftext|>"});
    if (eos_id < 0) eos_id = first_of({"<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>"});
    if (add_bos && bos_id < 0)
        throw Error(fmt("%s: sequences start with BOS, but no BOS token is known", where.c_str()));
}

bool Bpe::is_tiktoken(const std::string& bytes) {
    size_t end = bytes.find('\n');
    std::string_view line(bytes.data(), end == std::string::npos ? bytes.size() : end);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    size_t sp = line.find(' ');
    std::string tmp;
    return sp != std::string_view::npos && sp + 1 < line.size() && base64_decode(line.substr(0, sp), tmp) &&
           line.find_first_not_of("0123456789", sp + 1) == std::string_view::npos;
}

Bpe Bpe::from_tiktoken(const std::string& text, const std::string& where) {
    const char* w = where.c_str();
    Bpe m;
    std::vector<std::string_view> lines;
    for (size_t at = 0; at < text.size();) {
        size_t end = text.find('\n', at);
        if (end == std::string::npos) end = text.size();
        std::string_view line(text.data() + at, end - at);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        lines.push_back(line);
        at = end + 1;
    }
    while (!lines.empty() && lines.back().empty()) lines.pop_back();
    if (lines.empty()) throw Error(fmt("%s: an empty tiktoken file", w));
    const size_t n = lines.size();
    m.bytes_.assign(n, std::string());
    std::vector<bool> seen(n);
    std::string bytes;
    for (size_t i = 0; i < n; i++) {
        std::string_view line = lines[i];
        size_t sp = line.find(' ');
        std::string_view rank_text = sp == std::string_view::npos ? std::string_view() : line.substr(sp + 1);
        if (sp == std::string_view::npos || !base64_decode(line.substr(0, sp), bytes) || rank_text.empty() ||
            rank_text.size() > 9 || rank_text.find_first_not_of("0123456789") != std::string_view::npos)
            throw Error(fmt("%s: line %zu '%.60s' is not \"base64(token bytes) rank\"", w, i + 1,
                            std::string(line).c_str()));
        size_t rank = std::stoul(std::string(rank_text));
        // Ranks are ids: each of 0 .. n-1 exactly once, so the special tokens follow at n.
        if (rank >= n || seen[rank])
            throw Error(fmt("%s: line %zu: rank %zu %s", w, i + 1, rank,
                            rank >= n ? fmt("is not below the number of lines, %zu", n).c_str() : "appears twice"));
        seen[rank] = true;
        if (!m.ids_.emplace(bytes, int(rank)).second)
            throw Error(fmt("%s: line %zu: the token bytes of rank %zu appear twice", w, i + 1, rank));
        m.bytes_[rank] = bytes;
    }
    // tiktoken merges the adjacent pair whose concatenation has the lowest rank. As merges keyed by
    // pair: every token that splits into two tokens merges from them, with its own rank.
    m.merges_.reserve(n * 4);
    for (size_t id = 0; id < n; id++) {
        const std::string& t = m.bytes_[id];
        for (size_t k = 1; k < t.size(); k++) {
            auto a = m.ids_.find(t.substr(0, k));
            if (a == m.ids_.end()) continue;
            auto b = m.ids_.find(t.substr(k));
            if (b == m.ids_.end()) continue;
            m.merges_[uint64_t(a->second) << 32 | uint32_t(b->second)] = {int(id), int(id)};
        }
    }
    for (int b = 0; b < 256; b++)  // tiktoken fails on a byte it has no token for: refuse the file
        if (!m.ids_.count(std::string(1, char(b))))
            throw Error(fmt("%s: no token for byte 0x%02X: every byte needs one", w, b));
    m.ignore_merges_ = true;  // tiktoken takes a piece that is a token as it is
    m.steps_.push_back({false, std::make_shared<Regex>(kLlama3Pattern, false, where)});
    for (const std::string& s : llama3_special_tokens()) {
        m.added_.push_back({s, int(m.bytes_.size()), true});
        m.bytes_.push_back(s);
    }
    m.bos_id = int(n);      // <|begin_of_text|>
    m.eos_id = int(n) + 1;  // <|end_of_text|>
    m.add_bos = true;
    m.finish(where);
    return m;
}

Bpe Bpe::from_hf_json(const std::string& text, const std::string& where) {
    const char* w = where.c_str();
    json j;
    try {
        j = json::parse(text, JsonDepthLimit{where});
    } catch (const json::exception& e) {
        throw Error(fmt("%s: not valid JSON (%s)", w, e.what()));
    }
    if (!j.is_object()) throw Error(fmt("%s: not a tokenizer.json (not a JSON object)", w));
    const json* model = member(j, "model");
    if (!model || !model->is_object()) throw Error(fmt("%s: no \"model\" object", w));
    const std::string type = type_of(*model, where, "\"model\"");
    if (type != "BPE") throw Error(fmt("%s: model type '%s' is not supported (byte-level BPE only)", w, type.c_str()));
    if (flag(*model, "byte_fallback", false, where))
        throw Error(fmt("%s: model \"byte_fallback\": sentencepiece-style BPE is not supported (byte-level only)", w));
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
        if (const json* v = member(*model, key); v && !(v->is_string() && v->get<std::string>().empty()))
            throw Error(fmt("%s: model \"%s\" %s is not supported", w, key, v->dump().c_str()));
    if (const json* v = member(*model, "dropout"); v && !(v->is_number() && v->get<double>() == 0))
        throw Error(fmt("%s: model \"dropout\" %s is not supported (it makes encoding random)", w, v->dump().c_str()));
    if (const json* v = member(j, "normalizer"))
        throw Error(fmt("%s: normalizer '%s' is not supported", w, type_of(*v, where, "\"normalizer\"").c_str()));

    Bpe m;
    m.ignore_merges_ = flag(*model, "ignore_merges", false, where);
    m.fuse_unk_ = flag(*model, "fuse_unk", false, where);

    // Vocabulary: token text (byte-level characters) -> id.
    const json* vocab = member(*model, "vocab");
    if (!vocab || !vocab->is_object()) throw Error(fmt("%s: model has no \"vocab\" object", w));
    std::unordered_map<std::string, int> text_id;
    text_id.reserve(vocab->size());
    std::vector<std::string> text_of;  // [id] the vocabulary's text
    for (const auto& [tok, v] : vocab->items()) {
        int id = token_id(v, fmt("%s: vocab '%s'", w, tok.c_str()));
        if (size_t(id) >= text_of.size()) text_of.resize(size_t(id) + 1);
        if (!text_of[id].empty() || tok.empty())
            throw Error(fmt("%s: vocab: id %d is given to '%s' and '%s'", w, id, text_of[id].c_str(), tok.c_str()));
        text_of[id] = tok;
        text_id[tok] = id;
    }
    m.bytes_.resize(text_of.size());
    for (size_t id = 0; id < text_of.size(); id++) {
        if (text_of[id].empty()) continue;
        m.bytes_[id] = byte_level_decode(text_of[id]);
        m.ids_.emplace(m.bytes_[id], int(id));
    }
    if (const json* unk = member(*model, "unk_token")) {  // what a byte without a token becomes
        if (!unk->is_string() || !text_id.count(unk->get<std::string>()))
            throw Error(fmt("%s: model \"unk_token\" %s is not a token of the vocab", w, unk->dump().c_str()));
        m.unk_id_ = text_id[unk->get<std::string>()];
    }

    // Merges, in rank order: "left right" strings or ["left", "right"] pairs.
    const json* merges = member(*model, "merges");
    if (!merges || !merges->is_array()) throw Error(fmt("%s: model has no \"merges\" array", w));
    m.merges_.reserve(merges->size());
    for (size_t r = 0; r < merges->size(); r++) {
        const json& e = (*merges)[r];
        std::string a, b;
        if (e.is_string()) {
            const std::string s = e.get<std::string>();
            size_t sp = s.find(' ');
            if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
                throw Error(fmt("%s: merges[%zu] '%s' is not two tokens separated by one space", w, r, s.c_str()));
            a = s.substr(0, sp);
            b = s.substr(sp + 1);
        } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
            a = e[0].get<std::string>();
            b = e[1].get<std::string>();
        } else {
            throw Error(fmt("%s: merges[%zu] %.200s is neither \"a b\" nor [\"a\", \"b\"]", w, r, e.dump().c_str()));
        }
        for (const std::string& t : {a, b, a + b})
            if (!text_id.count(t))
                throw Error(fmt("%s: merges[%zu] '%s %s': %s'%s' is not in the vocab", w, r, a.c_str(), b.c_str(),
                                t.size() > std::max(a.size(), b.size()) ? "the merged token " : "", t.c_str()));
        // A repeated pair takes its last rank, as tokenizers' map built from the list does.
        m.merges_[uint64_t(text_id[a]) << 32 | uint32_t(text_id[b])] = {int(r), text_id[a + b]};
    }

    // Added tokens: matched in the text before pre-tokenization.
    if (const json* added = member(j, "added_tokens")) {
        if (!added->is_array()) throw Error(fmt("%s: \"added_tokens\" is not an array", w));
        for (const json& a : *added) {
            const json* content = a.is_object() ? member(a, "content") : nullptr;
            const json* id = a.is_object() ? member(a, "id") : nullptr;
            if (!content || !content->is_string() || content->get<std::string>().empty() || !id)
                throw Error(fmt("%s: added_tokens entry %.200s needs an \"id\" and a non-empty \"content\"", w,
                                a.dump().c_str()));
            const std::string c = content->get<std::string>();
            const std::string at = fmt("%s: added token '%s'", w, c.c_str());
            for (const char* key : {"lstrip", "rstrip", "single_word"})
                if (flag(a, key, false, at)) throw Error(fmt("%s: \"%s\": true is not supported", at.c_str(), key));
            int i = token_id(*id, at);
            if (size_t(i) >= m.bytes_.size()) m.bytes_.resize(size_t(i) + 1);
            m.bytes_[i] = c;  // decodes to its content, whatever the vocabulary says
            m.added_.push_back({c, i, flag(a, "special", false, at)});
        }
    }

    // Pre-tokenizer: splitting steps, then ByteLevel (whose character mapping we skip: we work
    // on bytes, and map the vocabulary instead), which must come last.
    bool byte_level = false;
    std::function<void(const json&)> pre = [&](const json& p) {
        const std::string t = type_of(p, where, "a pre_tokenizer");
        if (byte_level) throw Error(fmt("%s: pre_tokenizer '%s' after ByteLevel is not supported", w, t.c_str()));
        if (t == "Sequence") {
            const json* list = member(p, "pretokenizers");
            if (!list || !list->is_array())
                throw Error(fmt("%s: pre_tokenizer Sequence has no \"pretokenizers\" array", w));
            for (const json& q : *list) pre(q);
        } else if (t == "ByteLevel") {
            byte_level = true;
            if (flag(p, "add_prefix_space", true, where)) m.steps_.push_back({true, nullptr});
            if (flag(p, "use_regex", true, where))
                m.steps_.push_back({false, std::make_shared<Regex>(kGpt2Pattern, false, where)});
        } else if (t == "Digits") {  // Rust's char::is_numeric is \p{N}
            const char* re = flag(p, "individual_digits", false, where) ? R"(\p{N})" : R"(\p{N}+)";
            m.steps_.push_back({false, std::make_shared<Regex>(re, false, where)});
        } else if (t == "Split") {
            const json* behavior = member(p, "behavior");
            if (!behavior || *behavior != "Isolated")
                throw Error(fmt("%s: pre_tokenizer Split behavior %s is not supported (Isolated only)", w,
                                behavior ? behavior->dump().c_str() : "(none)"));
            if (flag(p, "invert", false, where))
                throw Error(fmt("%s: pre_tokenizer Split with invert is not supported", w));
            const json* pattern = member(p, "pattern");
            const json* regex = pattern && pattern->is_object() ? member(*pattern, "Regex") : nullptr;
            const json* literal = pattern && pattern->is_object() ? member(*pattern, "String") : nullptr;
            const json* s = regex ? regex : literal;
            if (!s || !s->is_string() || s->get<std::string>().empty())
                throw Error(fmt("%s: pre_tokenizer Split pattern %s is not {\"Regex\": ...} or {\"String\": ...}", w,
                                pattern ? pattern->dump().c_str() : "(none)"));
            m.steps_.push_back({false, std::make_shared<Regex>(s->get<std::string>(), literal != nullptr, where)});
        } else {
            throw Error(fmt("%s: pre_tokenizer '%s' is not supported (ByteLevel, Digits, Split, Sequence)", w,
                            t.c_str()));
        }
    };
    const json* pt = member(j, "pre_tokenizer");
    if (pt) pre(*pt);
    if (!byte_level) throw Error(fmt("%s: the pre_tokenizer has no ByteLevel step: not a byte-level BPE", w));
    const json* dec = member(j, "decoder");
    const std::string dec_type = dec ? type_of(*dec, where, "\"decoder\"") : "null";
    if (dec_type != "ByteLevel")
        throw Error(fmt("%s: decoder '%s' is not supported (ByteLevel only)", w, dec_type.c_str()));

    // BOS: the post-processor's (TemplateProcessing whose "single" template starts with a special
    // token, possibly inside a Sequence) is both the BOS and the sign that sequences start with it;
    // a "fastgen": {"add_bos": bool} object (our converters write it) has the last word.
    std::function<void(const json&)> post = [&](const json& p) {
        const json* type = p.is_object() ? member(p, "type") : nullptr;
        if (type && *type == "Sequence") {
            if (const json* list = member(p, "processors"); list && list->is_array())
                for (const json& q : *list) post(q);
        } else if (type && *type == "TemplateProcessing") {
            const json* single = member(p, "single");
            const json* first = single && single->is_array() && !single->empty() ? &(*single)[0] : nullptr;
            const json* st = first && first->is_object() ? member(*first, "SpecialToken") : nullptr;
            const json* name = st && st->is_object() ? member(*st, "id") : nullptr;
            if (!name || !name->is_string()) return;
            const std::string bos = name->get<std::string>();
            const json* specials = member(p, "special_tokens");
            const json* entry = specials && specials->is_object() ? member(*specials, bos.c_str()) : nullptr;
            const json* ids = entry && entry->is_object() ? member(*entry, "ids") : nullptr;
            int id = ids && ids->is_array() && ids->size() == 1 ? token_id((*ids)[0], where + ": post_processor")
                                                                : m.special_id(bos);
            if (id < 0 || id >= m.vocab_size())
                throw Error(fmt("%s: post_processor: BOS '%s' is not a token", w, bos.c_str()));
            m.bos_id = id;
            m.add_bos = true;
        }
    };
    if (const json* p = member(j, "post_processor")) post(*p);
    if (const json* f = member(j, "fastgen")) {
        if (!f->is_object()) throw Error(fmt("%s: \"fastgen\" is not an object", w));
        m.add_bos = flag(*f, "add_bos", m.add_bos, where + ": fastgen");
    }
    m.finish(where);
    return m;
}

// ---------------------------------------------------------------------------------------------
// Encoding

// Per-call state, so that one Bpe serves any number of threads.
struct Bpe::Scratch {
    std::vector<pcre2_match_data*> md;  // [step] match data for the step's regex
    // Pieces seen before in this text: words repeat, and merging is the costly part.
    std::unordered_map<std::string, std::vector<int>> cache;
    struct Candidate {
        int rank, pos, left, right, id;  // merge `left right` -> id of the symbols at pos, next[pos]
        bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<int> sym, next, prev;  // [piece bytes] symbol ids (-1 once merged away), links
    std::vector<Candidate> heap;

    explicit Scratch(const std::vector<PreStep>& steps) {
        for (const PreStep& s : steps) {
            md.push_back(s.split ? pcre2_match_data_create_from_pattern(s.split->code(), nullptr) : nullptr);
            if (s.split && !md.back()) throw Error("tokenizer: out of memory for regex match data");
        }
    }
    ~Scratch() {
        for (pcre2_match_data* d : md) pcre2_match_data_free(d);  // null is allowed
    }
};

std::vector<int> Bpe::encode(const std::string& text, bool allow_special) const {
    Scratch s(steps_);
    std::vector<int> out;
    out.reserve(text.size() / 3 + 1);
    size_t start = 0;  // of the text not yet encoded
    for (size_t i = 0; i < text.size();) {
        const Added* hit = nullptr;
        if (added_first_byte_[uint8_t(text[i])])
            for (const Added& a : added_)
                if ((allow_special || !a.special) && text.compare(i, a.content.size(), a.content) == 0) {
                    hit = &a;
                    break;
                }
        if (!hit) {
            i++;
            continue;
        }
        if (i > start) encode_piece(text.substr(start, i - start), 0, s, out);
        out.push_back(hit->id);
        start = i += hit->content.size();
    }
    if (text.size() > start) encode_piece(text.substr(start), 0, s, out);
    return out;
}

// Runs pre-tokenizer steps `step`.. on `piece`, merging what comes out of the last.
void Bpe::encode_piece(const std::string& piece, size_t step, Scratch& s, std::vector<int>& out) const {
    if (step == steps_.size()) return merge(piece, s, out);
    const PreStep& st = steps_[step];
    if (st.prefix_space) return encode_piece(piece[0] == ' ' ? piece : " " + piece, step + 1, s, out);
    st.split->split(piece, s.md[step],
                    [&](size_t b, size_t e) { encode_piece(piece.substr(b, e - b), step + 1, s, out); });
}

// BPE on one piece: start from one symbol per byte and repeatedly merge the adjacent pair with the
// lowest rank (the leftmost of equals), as tokenizers and tiktoken do. A heap of candidate pairs
// keeps long pieces O(n log n); candidates made stale by a neighbouring merge are skipped on pop.
void Bpe::merge(const std::string& piece, Scratch& s, std::vector<int>& out) const {
    if (piece.size() == 1 && byte_id_[uint8_t(piece[0])] >= 0) return out.push_back(byte_id_[uint8_t(piece[0])]);
    if (ignore_merges_) {
        auto it = ids_.find(piece);
        if (it != ids_.end()) return out.push_back(it->second);
    }
    constexpr size_t kCacheable = 64;  // longer pieces rarely repeat
    const bool cacheable = piece.size() <= kCacheable;
    if (cacheable) {
        auto it = s.cache.find(piece);
        if (it != s.cache.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    // One symbol per byte. A byte the vocabulary lacks (SmolLM2 has no token for some control
    // bytes) is dropped, or becomes unk_token (one for a run with fuse_unk), as in tokenizers.
    s.sym.clear();
    bool after_unk = false;
    for (char ch : piece) {
        int id = byte_id_[uint8_t(ch)];
        if (id < 0 && (unk_id_ < 0 || (fuse_unk_ && after_unk))) continue;
        after_unk = id < 0;
        s.sym.push_back(id < 0 ? unk_id_ : id);
    }
    const size_t n = s.sym.size();
    s.next.resize(n);
    s.prev.resize(n);
    s.heap.clear();
    auto push = [&](int pos) {  // the pair starting at symbol pos, if it merges
        const int nx = s.next[pos];
        if (nx < 0) return;
        auto it = merges_.find(uint64_t(s.sym[pos]) << 32 | uint32_t(s.sym[nx]));
        if (it == merges_.end()) return;
        s.heap.push_back({it->second.rank, pos, s.sym[pos], s.sym[nx], it->second.id});
        std::push_heap(s.heap.begin(), s.heap.end(), std::greater<>());
    };
    for (size_t i = 0; i < n; i++) {
        s.prev[i] = int(i) - 1;
        s.next[i] = i + 1 < n ? int(i) + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) push(int(i));
    while (!s.heap.empty()) {
        std::pop_heap(s.heap.begin(), s.heap.end(), std::greater<>());
        const Scratch::Candidate c = s.heap.back();
        s.heap.pop_back();
        const int nx = s.next[c.pos];
        if (s.sym[c.pos] != c.left || nx < 0 || s.sym[nx] != c.right) continue;  // stale
        s.sym[c.pos] = c.id;
        s.sym[nx] = -1;
        s.next[c.pos] = s.next[nx];
        if (s.next[nx] >= 0) s.prev[s.next[nx]] = c.pos;
        if (s.prev[c.pos] >= 0) push(s.prev[c.pos]);
        push(c.pos);
    }
    const size_t first = out.size();
    for (int i = n ? 0 : -1; i >= 0; i = s.next[i]) out.push_back(s.sym[i]);
    if (cacheable) s.cache.emplace(piece, std::vector<int>(out.begin() + first, out.end()));
}
