// chat.h: chat formats for `generate --interactive`: how a conversation is laid out as tokens
// (Llama 2's [INST], Llama 3's header tokens, ChatML's <|im_start|>), chosen from the model's own
// Jinja chat template by its markers, or by name.
#pragma once
#include <optional>
#include <string>
#include <vector>

class Tokenizer;

enum class ChatFormat { Llama2, Llama3, ChatML };

const char* chat_format_name(ChatFormat f);  // "llama2", "llama3", "chatml"
// A --chat-template name; throws Error naming the flag and value for anything else.
ChatFormat parse_chat_format(const std::string& name);
// The format a Jinja chat template (model.bin metadata "chat_template", from GGUF or HF) renders,
// recognised by the markers it writes; nullopt when it is none of ours. We do not run Jinja: the
// three formats cover the Llama family and the many models that use ChatML.
std::optional<ChatFormat> detect_chat_format(const std::string& jinja);
// The system message a template inserts when the conversation has none (SmolLM2's "You are a
// helpful AI assistant named SmolLM, ..."), or "".
std::string template_default_system(const std::string& jinja);

// One conversation's text conventions. Texts contain special tokens by their content
// ("<|im_start|>"); Llama 2's BOS/EOS are ids, not text (sentencepiece has no special text).
struct ChatStyle {
    ChatFormat format;
    std::string system;  // "" = no system message

    // A user turn up to the assistant header that makes the model answer. `first`: the
    // conversation's opening (system message; Llama 3's <|begin_of_text|>).
    std::string user_turn(const std::string& user, bool first) const;
    // Content of the token that ends an assistant answer ("" = the model's EOS, Llama 2).
    std::string end_of_answer() const;
    // Text that follows that token before the next turn (ChatML: "\n").
    std::string after_answer() const;
};

// Tokens of a chat text: special tokens by content become their ids; Llama 2 turns start with BOS.
std::vector<int> chat_tokens(const Tokenizer& tok, const ChatStyle& style, const std::string& text, bool turn_start);

// A whole conversation (the server's messages) as the model sees it, up to the assistant header
// of the answer to come: user turns as user_turn, earlier answers closed by `end_id` and
// after_answer(), exactly as --interactive keeps its history. `turns` alternate user, assistant,
// ..., user (the system message is style.system); throws Error otherwise.
struct ChatTurn {
    bool user;
    std::string text;
};
std::vector<int> conversation_tokens(const Tokenizer& tok, const ChatStyle& style, int end_id,
                                     const std::vector<ChatTurn>& turns);
