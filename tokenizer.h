// tokenizer.h: the model's tokenizer, sentencepiece (through libsentencepiece) or byte-level BPE
// (bpe.h), and streaming detokenization that never emits half a UTF-8 character.
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece { class SentencePieceProcessor; }
class Bpe;

class Tokenizer {
  public:
    // bytes: a tokenizer as embedded in model.bin, recognised by its content: a Hugging Face
    // tokenizer.json (byte-level BPE), a Llama 3 tiktoken file, or a serialized sentencepiece
    // ModelProto. `where` names the source in errors ("model.bin: tokenizer.model").
    Tokenizer(const std::string& bytes, const std::string& where);
    ~Tokenizer();
    // add_bos: `text` starts a sequence, so BOS goes first where the model's convention has one
    // (sentencepiece: always; BPE: as its tokenizer.json says, see bpe.cpp). Special tokens'
    // text ("<|im_start|>") is tokenized as text.
    std::vector<int> encode(const std::string& text, bool add_bos, bool add_eos) const;
    // Tokens of a text that writes special tokens by their content ("<|im_start|>user\n..."):
    // those become their ids; nothing is added. sentencepiece has no special text: encode(text).
    std::vector<int> encode_special(const std::string& text) const;
    // The text of `ids`. BPE: special tokens give their content, the bytes are returned as they
    // are (possibly invalid UTF-8 when ids end inside a character).
    std::string decode(const std::vector<int>& ids) const;
    int vocab_size() const;
    int bos_id() const;  // -1: the model has none
    int eos_id() const;
    // The bytes token `id` stands for when it follows `prev` (-1: first in the stream). sentencepiece
    // drops the leading space of the first piece after BOS, and byte-fallback pieces <0xAB> become
    // one raw byte; BPE gives decode({id}), except BOS first in a stream, which is invisible.
    std::string token_bytes(int prev, int id) const;

  private:
    std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;  // one of these two
    std::unique_ptr<Bpe> bpe_;
};

// True when `bytes` hold a tokenizer.json (a JSON object) rather than a tokenizer.model.
bool is_tokenizer_json(const std::string& bytes);

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
