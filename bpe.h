// bpe.h: byte-level BPE (GPT-2, Llama 3, SmolLM2), read from a Hugging Face tokenizer.json or a
// Llama 3 tiktoken file; pre-tokenized with PCRE2 regexes, merged by rank.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

class Regex;  // a compiled PCRE2 pattern (bpe.cpp)

class Bpe {
  public:
    // A Hugging Face tokenizer.json: model.type "BPE" (vocab, merges as "a b" or ["a", "b"],
    // ignore_merges, unk_token/fuse_unk); pre_tokenizer ByteLevel (last), Digits, Split (Isolated)
    // or a Sequence of them; no normalizer; decoder ByteLevel; added_tokens. Anything else is
    // refused with an Error naming `where` and the field.
    // BOS: sequences start with one when the post_processor is a TemplateProcessing (or a Sequence
    // holding one) whose "single" template opens with a special token, which is then the BOS; a
    // top-level "fastgen": {"add_bos": bool} (our GGUF importer writes one) overrides that.
    // Where the file names no BOS/EOS, the first present of <|begin_of_text|>, <s>, <|endoftext|>
    // (BOS) and <|end_of_text|>, </s>, <|endoftext|>, <|im_end|> (EOS); a config's ids win in convert.
    static Bpe from_hf_json(const std::string& text, const std::string& where);
    // Meta's Llama 3 tokenizer.model: lines "base64(token bytes) rank", the rank being the id; the
    // Llama 3 regex; Meta's 256 special tokens after the base vocabulary; BOS <|begin_of_text|>.
    static Bpe from_tiktoken(const std::string& text, const std::string& where);
    // True when `bytes` look like a tiktoken file (a first line "base64 rank").
    static bool is_tiktoken(const std::string& bytes);

    Bpe(Bpe&&) noexcept;
    ~Bpe();

    // Token ids of `text` (any bytes: invalid UTF-8 is kept, byte by byte, as byte tokens). Added
    // tokens written in the text are matched first: non-special ones always, special ones only
    // with `allow_special` (else their text is tokenized like any other).
    std::vector<int> encode(const std::string& text, bool allow_special) const;
    // The bytes id stands for: an added token's content, else the token's raw bytes. "" for ids
    // with no token (holes in the vocabulary).
    const std::string& token_bytes(int id) const { return bytes_[size_t(id)]; }
    int vocab_size() const { return int(bytes_.size()); }
    // The id of the special (or added) token whose content is `content`, or -1.
    int special_id(const std::string& content) const;

    int bos_id = -1, eos_id = -1;  // -1: none
    bool add_bos = false;          // the model's convention: sequences start with BOS

  private:
    Bpe();
    struct Merge {
        int rank;  // lower merges first
        int id;    // the merged token
    };
    struct Added {
        std::string content;
        int id;
        bool special;
    };
    struct PreStep {                  // one pre-tokenizer step, applied to every piece
        bool prefix_space = false;    // ByteLevel add_prefix_space: " " before a piece without one
        std::shared_ptr<Regex> split; // else: split each piece into matches and the text between
    };
    struct Scratch;

    void finish(const std::string& where);  // checks and lookup tables once the vocabulary is in
    void encode_piece(const std::string& piece, size_t step, Scratch& s, std::vector<int>& out) const;
    void merge(const std::string& piece, Scratch& s, std::vector<int>& out) const;

    std::vector<std::string> bytes_;                // [vocab] what each id decodes to
    std::unordered_map<std::string, int> ids_;      // model token bytes -> id (not added tokens)
    int byte_id_[256];                              // the token of each single byte, -1 for none
    int unk_id_ = -1;                               // model.unk_token: stands for bytes without a token
    bool fuse_unk_ = false;                         // a run of such bytes is one unk
    std::unordered_map<uint64_t, Merge> merges_;    // (left id << 32 | right id) -> merge
    bool ignore_merges_ = false;                    // a piece that is a whole token stays one
    std::vector<PreStep> steps_;
    std::vector<Added> added_;                      // longest content first
    bool added_first_byte_[256] = {};               // some added token starts with this byte
};
