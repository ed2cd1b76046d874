// tokenizer.h: sentencepiece tokenization (through libsentencepiece) and streaming detokenization
// that never emits half a UTF-8 character.
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece { class SentencePieceProcessor; }

class Tokenizer {
  public:
    // model_bytes: a serialized sentencepiece ModelProto (as embedded in model.bin).
    // `where` names the source in errors ("model.bin: tokenizer.model").
    Tokenizer(const std::string& model_bytes, const std::string& where);
    ~Tokenizer();
    std::vector<int> encode(const std::string& text, bool add_bos, bool add_eos) const;
    std::string decode(const std::vector<int>& ids) const;
    int vocab_size() const;
    int bos_id() const;
    int eos_id() const;
    // The bytes token `id` stands for when it follows `prev` (sentencepiece drops the leading
    // space of the first piece after BOS; byte-fallback pieces <0xAB> become one raw byte).
    std::string token_bytes(int prev, int id) const;

  private:
    std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

// Turns a stream of token ids into text, holding back bytes until they complete a UTF-8 character.
class StreamDecoder {
  public:
    explicit StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
    std::string push(int id);  // the complete characters now available (possibly "")
    std::string flush();       // whatever is still held (invalid sequences as U+FFFD)

  private:
    const Tokenizer& tok_;
    int prev_ = -1;
    std::string pending_;
};
