// tokenizer.cpp: the model's tokenizer, chosen by what its bytes hold: sentencepiece through
// libsentencepiece or byte-level BPE (bpe.cpp); and a streaming decoder that only ever emits
// whole, valid UTF-8 characters.
#include "tokenizer.h"

#include <sentencepiece_processor.h>

#include <cstdlib>

#include "bpe.h"
#include "common.h"

// ---------------------------------------------------------------------------------------------
// Tokenizer

bool is_tokenizer_json(const std::string& bytes) {
    size_t i = bytes.find_first_not_of(" \t\r\n");
    return i != std::string::npos && bytes[i] == '{';
}

Tokenizer::Tokenizer(const std::string& bytes, const std::string& where) {
    // A ModelProto starts with a binary field tag (0x0A), never '{' or a base64 line.
    if (is_tokenizer_json(bytes)) {
        bpe_ = std::make_unique<Bpe>(Bpe::from_hf_json(bytes, where));
    } else if (Bpe::is_tiktoken(bytes)) {
        bpe_ = std::make_unique<Bpe>(Bpe::from_tiktoken(bytes, where));
    } else {
        sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
        sentencepiece::util::Status status;
        try {
            status = sp_->LoadFromSerializedProto(bytes);
        } catch (const std::exception& e) {
            // libsentencepiece's trie builder (darts_clone) throws rather than returning a status on
            // some malformed models, such as an empty piece (found by fuzz_tokenizer).
            throw Error(fmt("%s: not a usable sentencepiece model (%s)", where.c_str(), e.what()));
        }
        if (!status.ok())
            throw Error(fmt("%s: not a sentencepiece model, a tokenizer.json or a tiktoken file (%s)", where.c_str(),
                            status.ToString().c_str()));
    }
}

Tokenizer::~Tokenizer() = default;  // here, where SentencePieceProcessor and Bpe are complete types

int Tokenizer::vocab_size() const { return bpe_ ? bpe_->vocab_size() : sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return bpe_ ? bpe_->bos_id : sp_->bos_id(); }
int Tokenizer::eos_id() const { return bpe_ ? bpe_->eos_id : sp_->eos_id(); }

std::vector<int> Tokenizer::encode(const std::string& text, bool add_bos, bool add_eos) const {
    if (bpe_) add_bos = add_bos && bpe_->add_bos;  // BPE models that start without BOS
    // A model trained without BOS/EOS reports -1; never let that reach the model as a token.
    if ((add_bos && bos_id() < 0) || (add_eos && eos_id() < 0))
        throw Error(fmt("tokenizer: the model has no %s token", add_bos && bos_id() < 0 ? "BOS" : "EOS"));
    std::vector<int> pieces;
    if (bpe_) {
        pieces = bpe_->encode(text, false);
    } else {
        auto status = sp_->Encode(text, &pieces);
        if (!status.ok()) throw Error(fmt("tokenizer: cannot encode text (%s)", status.ToString().c_str()));
    }
    std::vector<int> ids;
    ids.reserve(pieces.size() + 2);
    if (add_bos) ids.push_back(bos_id());
    ids.insert(ids.end(), pieces.begin(), pieces.end());
    if (add_eos) ids.push_back(eos_id());
    return ids;
}

std::vector<int> Tokenizer::encode_special(const std::string& text) const {
    return bpe_ ? bpe_->encode(text, true) : encode(text, false, false);
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
    std::string text;
    if (bpe_) {
        for (int id : ids) {
            if (id < 0 || id >= vocab_size())
                throw Error(fmt("tokenizer: cannot decode id %d (the vocabulary has %d tokens)", id, vocab_size()));
            text += bpe_->token_bytes(id);
        }
        return text;
    }
    auto status = sp_->Decode(ids, &text);
    if (!status.ok()) throw Error(fmt("tokenizer: cannot decode ids (%s)", status.ToString().c_str()));
    return text;
}

std::string Tokenizer::token_bytes(int prev, int id) const {
    if (id < 0) throw Error(fmt("tokenizer: negative token id %d", id));
    if (id >= vocab_size()) return "";  // a model's padded vocabulary: ids the tokenizer has no piece for
    if (bpe_) return prev < 0 && id == bos_id() ? "" : bpe_->token_bytes(id);  // BOS: a marker, not text
    if (sp_->IsControl(id)) return "";                         // <s>, </s>: invisible
    if (sp_->IsUnknown(id)) return sp_->DecodeIds({id});       // the model's unk surface (" ⁇ ")
    const std::string& piece = sp_->IdToPiece(id);
    // Byte-fallback pieces are "<0xAB>": one raw byte, possibly part of a multi-byte character.
    if (sp_->IsByte(id)) return std::string(1, char(std::strtol(piece.c_str() + 3, nullptr, 16)));
    static const std::string kSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's word boundary
    std::string out;
    for (size_t i = 0; i < piece.size();) {
        if (piece.compare(i, kSpace.size(), kSpace) == 0) {
            out += ' ';
            i += kSpace.size();
        } else {
            out += piece[i++];
        }
    }
    // The dummy prefix sentencepiece adds before the first word is not part of the text.
    if ((prev < 0 || prev == bos_id()) && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
}

// ---------------------------------------------------------------------------------------------
// StreamDecoder

static const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// Appends the valid UTF-8 of `s` to `out`, each invalid byte sequence as one U+FFFD, and returns
// where an incomplete (but so far valid) trailing character starts, or s.size() if there is none.
static size_t append_valid_utf8(const std::string& s, std::string& out) {
    size_t i = 0;
    while (i < s.size()) {
        unsigned char b = s[i];
        int len = b < 0x80 ? 1 : b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3
                : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
        if (len == 0) {  // a stray continuation byte, or a lead byte that no character uses
            out += kReplacement;
            i++;
            continue;
        }
        // The second byte's range excludes overlongs and surrogates (Unicode Table 3-7).
        unsigned char lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
        unsigned char hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
        size_t n = 1;
        while (n < size_t(len) && i + n < s.size()) {
            unsigned char c = s[i + n];
            if (c < (n == 1 ? lo : 0x80) || c > (n == 1 ? hi : 0xBF)) break;
            n++;
        }
        if (n == size_t(len)) {
            out.append(s, i, n);
        } else if (i + n == s.size()) {
            return i;  // valid so far, cut off by the end: the next token may complete it
        } else {
            out += kReplacement;  // broken by the byte at i + n, which is examined afresh
        }
        i += n;
    }
    return s.size();
}

std::string StreamDecoder::push(int id) {
    pending_ += tok_.token_bytes(prev_, id);
    prev_ = id;
    std::string out;
    pending_.erase(0, append_valid_utf8(pending_, out));  // keeps at most 3 bytes held back
    return out;
}

std::string StreamDecoder::flush() {
    std::string out;
    if (append_valid_utf8(pending_, out) < pending_.size()) out += kReplacement;
    pending_.clear();
    return out;
}
