// chat.cpp: the three chat layouts, their recognition in Jinja templates, and their tokens.
#include "chat.h"

#include "common.h"
#include "tokenizer.h"

const char* chat_format_name(ChatFormat f) {
    switch (f) {
        case ChatFormat::Llama2: return "llama2";
        case ChatFormat::Llama3: return "llama3";
        case ChatFormat::ChatML: return "chatml";
    }
    return "?";
}

ChatFormat parse_chat_format(const std::string& name) {
    for (ChatFormat f : {ChatFormat::Llama2, ChatFormat::Llama3, ChatFormat::ChatML})
        if (name == chat_format_name(f)) return f;
    throw Error(fmt("--chat-template %s: not a known format (llama2, llama3, chatml)", name.c_str()));
}

std::optional<ChatFormat> detect_chat_format(const std::string& jinja) {
    // Most specific first: a Llama 3 template never writes <|im_start|>, a ChatML one never [INST].
    if (jinja.find("<|start_header_id|>") != std::string::npos) return ChatFormat::Llama3;
    if (jinja.find("<|im_start|>") != std::string::npos) return ChatFormat::ChatML;
    if (jinja.find("[INST]") != std::string::npos) return ChatFormat::Llama2;
    return std::nullopt;
}

std::string template_default_system(const std::string& jinja) {
    // The literal in e.g. {{ '<|im_start|>system\nYou are ...<|im_end|>\n' }}: the newline may be a
    // real one or Jinja's escape.
    const std::string head = "<|im_start|>system";
    size_t at = jinja.find(head);
    if (at == std::string::npos) return "";
    at += head.size();
    if (jinja.compare(at, 1, "\n") == 0) at += 1;
    else if (jinja.compare(at, 2, "\\n") == 0) at += 2;
    else return "";
    const size_t end = jinja.find("<|im_end|>", at);
    if (end == std::string::npos) return "";
    std::string text = jinja.substr(at, end - at);
    // Only a plain literal counts; a template that splices variables there has no default.
    if (text.empty() || text.find_first_of("{}'\"+") != std::string::npos) return "";
    return text;
}

std::string ChatStyle::user_turn(const std::string& user, bool first) const {
    std::string t;
    switch (format) {
        case ChatFormat::Llama2:  // HF's template: [INST] <<SYS>>\n...\n<</SYS>>\n\n{user} [/INST]
            t = "[INST] ";
            if (first && !system.empty()) t += "<<SYS>>\n" + system + "\n<</SYS>>\n\n";
            return t + user + " [/INST]";
        case ChatFormat::Llama3:
            if (first) {
                t = "<|begin_of_text|>";
                if (!system.empty()) t += "<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>";
            }
            return t + "<|start_header_id|>user<|end_header_id|>\n\n" + user +
                   "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        case ChatFormat::ChatML:
            if (first && !system.empty()) t = "<|im_start|>system\n" + system + "<|im_end|>\n";
            return t + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n";
    }
    return t;
}

std::string ChatStyle::end_of_answer() const {
    switch (format) {
        case ChatFormat::Llama2: return "";
        case ChatFormat::Llama3: return "<|eot_id|>";
        case ChatFormat::ChatML: return "<|im_end|>";
    }
    return "";
}

std::string ChatStyle::after_answer() const { return format == ChatFormat::ChatML ? "\n" : ""; }

std::vector<int> chat_tokens(const Tokenizer& tok, const ChatStyle& style, const std::string& text, bool turn_start) {
    if (style.format == ChatFormat::Llama2) {
        // Every Llama 2 turn opens with BOS; the text has no special tokens.
        std::vector<int> ids = tok.encode(text, false, false);
        if (turn_start) ids.insert(ids.begin(), tok.bos_id());
        return ids;
    }
    return tok.encode_special(text);
}

std::vector<int> conversation_tokens(const Tokenizer& tok, const ChatStyle& style, int end_id,
                                     const std::vector<ChatTurn>& turns) {
    if (turns.empty() || !turns.back().user) throw Error("the last message must be the user's");
    std::vector<int> ids;
    for (size_t i = 0; i < turns.size(); i++) {
        if (turns[i].user != (i % 2 == 0))
            throw Error(fmt("turn %zu (after any system message): user and assistant messages must alternate, starting with the user's", i));
        std::vector<int> t;
        if (turns[i].user) {
            t = chat_tokens(tok, style, style.user_turn(turns[i].text, i == 0), true);
        } else {
            t = chat_tokens(tok, style, turns[i].text, false);
            t.push_back(end_id);
            const std::string after = style.after_answer();
            if (!after.empty()) {
                std::vector<int> more = chat_tokens(tok, style, after, false);
                t.insert(t.end(), more.begin(), more.end());
            }
        }
        ids.insert(ids.end(), t.begin(), t.end());
    }
    return ids;
}
