// tests/test_cli.cpp: end-to-end runs of ./generate and ./quantize on stories260K: the llama2.c
// golden text, prompts, seeds, samples, perplexity, the llama2.c flag aliases, and refusal of misuse
// with a non-zero exit and a message naming the problem.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "test_util.h"
#include "tokenizer.h"

namespace {

using Run = CommandResult;
Run run(const std::string& cmd) { return run_command(cmd); }
std::string q(const std::string& s) { return shell_quote(s); }

bool exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

std::string tok512() { return models_dir() + "/tok512.model"; }

// stories260K.bin converted to model.bin once per test run (f32, as the source).
const std::string& s260() {
    static std::string path = [] {
        std::string p = temp_dir() + "/s260.bin";
        Run r = run("./quantize -q --input " + q(models_dir() + "/stories260K.bin") + " --tokenizer " + q(tok512()) +
                    " --output " + q(p));
        REQUIRE_MESSAGE(r.rc == 0, r.err);
        return p;
    }();
    return path;
}

std::string generate(const std::string& args) { return "./generate --checkpoint " + q(s260()) + " " + args; }

std::string chomp(std::string s) {
    if (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
}

// Expect a refusal: a normal non-zero exit, the message on stderr, nothing on stdout from generation.
void check_refused(const Run& r, const std::vector<std::string>& words) {
    CHECK_MESSAGE(r.rc > 0, "exit status " << r.rc << "\nstderr: " << r.err);
    for (const std::string& w : words) CHECK_MESSAGE(has(r.err, w), "expected '" << w << "' in stderr: " << r.err);
}

const char* kGolden =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want "
    "to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she";

}  // namespace

TEST_SUITE("cli") {

TEST_CASE("generate: stories260K greedy from BOS gives llama2.c's golden text") {
    Run r = run(generate("--temperature 0 --max-new-tokens 200"));
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK(chomp(r.out) == kGolden);
    CHECK(has(r.err, "generated 200 tokens"));
}

TEST_CASE("generate: a bf16 conversion still tells the story") {
    std::string bf16 = temp_dir() + "/s260-bf16.bin";
    Run c = run("./quantize -q --mode bf16 --input " + q(s260()) + " --output " + q(bf16));
    REQUIRE_MESSAGE(c.rc == 0, c.err);
    CHECK(has(c.out, "BF16"));
    Run r = run("./generate --checkpoint " + q(bf16) + " --temperature 0 --max-new-tokens 60");
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK_MESSAGE(r.out.rfind("Once upon a time", 0) == 0, r.out);
    CHECK(has(r.err, "(BF16)"));
    CHECK(r.out.size() > 150);  // 60 tokens of words, not an early EOS
}

TEST_CASE("generate: --prompt continues the prompt and prints the stats line") {
    Run r = run(generate("--prompt 'Once upon a time' --temperature 0 --max-new-tokens 40"));
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK_MESSAGE(r.out.rfind("Once upon a time", 0) == 0, r.out);
    CHECK(r.out.size() > std::string("Once upon a time").size() + 40);
    CHECK(has(r.err, "prompt 5 tokens"));  // BOS + [403, 407, 261, 378]
    CHECK(has(r.err, "generated 40 tokens"));
    CHECK(has(r.err, "decode"));
    CHECK(has(r.err, "tok/s"));
    CHECK(has(r.err, "GB/s"));
}

TEST_CASE("generate: a seed reproduces a sampled completion; another seed differs") {
    std::string args = "--temperature 1 --max-new-tokens 50 --seed ";
    Run a = run(generate(args + "7")), b = run(generate(args + "7")), c = run(generate(args + "8"));
    REQUIRE_MESSAGE(a.rc == 0, a.err);
    REQUIRE_MESSAGE(b.rc == 0, b.err);
    REQUIRE_MESSAGE(c.rc == 0, c.err);
    CHECK(a.out.size() > 20);
    CHECK(a.out == b.out);
    CHECK(a.out != c.out);
    CHECK(has(a.err, "seed 7"));
}

TEST_CASE("generate: --num-samples 2 prints two completions") {
    Run one = run(generate("--prompt 'The dog' --temperature 0 --max-new-tokens 20"));
    Run two = run(generate("--prompt 'The dog' --temperature 0 --max-new-tokens 20 --num-samples 2"));
    REQUIRE_MESSAGE(one.rc == 0, one.err);
    REQUIRE_MESSAGE(two.rc == 0, two.err);
    CHECK(two.out == one.out + one.out);  // greedy: the same completion twice
    CHECK(has(two.err, "sample 2 of 2"));
    // Sampled: the first sample is what one run with that seed prints; the second goes on with the
    // same generator and tells a different story.
    std::string args = "--prompt 'The dog' --temperature 1 --seed 3 --max-new-tokens 30";
    Run s1 = run(generate(args)), s2 = run(generate(args + " --num-samples 2"));
    REQUIRE_MESSAGE(s1.rc == 0, s1.err);
    REQUIRE_MESSAGE(s2.rc == 0, s2.err);
    REQUIRE(s2.out.rfind(s1.out, 0) == 0);
    std::string rest = s2.out.substr(s1.out.size());
    CHECK_MESSAGE(rest.rfind("The dog", 0) == 0, rest);
    CHECK(rest != s1.out);
}

TEST_CASE("generate: --perplexity is lower on a story than on its words shuffled") {
    const std::string story = "tests/data/tinystory.txt";
    Run r = run(generate("--perplexity " + story));
    REQUIRE_MESSAGE(r.rc == 0, r.err);
    CHECK(has(r.out, "perplexity:"));
    double ppl = perplexity_of(r.out);
    CHECK_MESSAGE(std::isfinite(ppl), r.out);
    CHECK(ppl > 1.0);

    std::istringstream words_in(read_file(story));
    std::vector<std::string> words;
    for (std::string w; words_in >> w;) words.push_back(w);
    REQUIRE(words.size() > 200);  // long enough to need two context windows
    std::shuffle(words.begin(), words.end(), std::mt19937(11));
    std::string shuffled = temp_dir() + "/shuffled.txt";
    {
        std::ofstream out(shuffled);
        for (size_t i = 0; i < words.size(); i++) out << (i ? " " : "") << words[i];
    }
    Run s = run(generate("--perplexity " + q(shuffled)));
    REQUIRE_MESSAGE(s.rc == 0, s.err);
    double shuffled_ppl = perplexity_of(s.out);
    CHECK_MESSAGE(std::isfinite(shuffled_ppl), s.out);
    CHECK_MESSAGE(ppl * 2 < shuffled_ppl, "perplexity: story " << ppl << ", shuffled " << shuffled_ppl);
}

// Mean NLL of `ids` in windows of `window` text tokens after BOS, from scripts/reference.py's logits.
double reference_mean_nll(const std::string& model, const std::vector<int>& ids, int window, int vocab) {
    double nll = 0;
    size_t counted = 0;
    for (size_t start = 0; start < ids.size(); start += size_t(window)) {
        std::vector<int> tokens{1};  // BOS
        tokens.insert(tokens.end(), ids.begin() + long(start), ids.begin() + long(std::min(ids.size(), start + window)));
        const std::vector<float> logits = reference_logits(model, tokens, vocab);
        for (size_t r = 0; r + 1 < tokens.size(); r++) {
            const float* l = logits.data() + r * vocab;
            double m = l[0], sum = 0;
            for (int v = 1; v < vocab; v++) m = std::max(m, double(l[v]));
            for (int v = 0; v < vocab; v++) sum += std::exp(double(l[v]) - m);
            nll += m + std::log(sum) - l[tokens[r + 1]];
            counted++;
        }
    }
    return nll / double(counted);
}

TEST_CASE("generate: --perplexity over windows longer than a forward chunk, and --kv-capacity cuts the window") {
    // A random model with a 1200-token context; the story three times (about 1200 tokens): windows
    // of 1199 tokens, run as prefill chunks of 512, 512 and 175. With --kv-capacity 704 (44 blocks
    // of 16: a cache holds whole blocks) the windows are 703 tokens.
    Config c = tiny_config(64, 128, 2, 4, 2, false);
    c.max_seq_len = 1200;
    const std::string model = temp_dir() + "/ppl_1200.bin", text = temp_dir() + "/story3.txt";
    write_model_bin(random_weights(c, 5), model, DType::F32);
    const std::string story = read_file("tests/data/tinystory.txt");
    write_bytes(text, story + "\n" + story + "\n" + story);
    const std::vector<int> ids = Tokenizer(read_file(tok512()), "tok512.model").encode(read_file(text), false, false);
    REQUIRE(ids.size() > 1000);
    for (int capacity : {0, 704}) {
        CAPTURE(capacity);
        Run r = run("./generate --device cpu --checkpoint " + q(model) + " --perplexity " + q(text) +
                    (capacity ? " --kv-capacity " + std::to_string(capacity) : std::string()));
        REQUIRE_MESSAGE(r.rc == 0, r.err);
        const double want = reference_mean_nll(model, ids, (capacity ? capacity : c.max_seq_len) - 1, c.vocab_size);
        const double got = std::log(perplexity_of(r.out));
        CHECK_MESSAGE(std::fabs(got - want) < 1e-4 * want, "mean NLL " << got << ", reference " << want);
    }
}

TEST_CASE("generate: the llama2.c flag spellings work") {
    Run a = run("./generate --checkpoint_path " + q(s260()) + " --temperature 0 --max_new_tokens 20");
    Run b = run(generate("--temperature 0 --max-new-tokens 20"));
    REQUIRE_MESSAGE(a.rc == 0, a.err);
    REQUIRE_MESSAGE(b.rc == 0, b.err);
    CHECK(a.out == b.out);
    CHECK(has(a.err, "generated 20 tokens"));
    CHECK(std::string(kGolden).rfind(chomp(a.out), 0) == 0);
}

TEST_CASE("generate: misuse exits non-zero with a message naming the problem") {
    SUBCASE("missing checkpoint") {
        std::string p = temp_dir() + "/no-such-model.bin";
        check_refused(run("./generate --checkpoint " + q(p)), {"--checkpoint", p});
    }
    SUBCASE("checkpoint flag left out") {
        check_refused(run("./generate --prompt hello"), {"--checkpoint"});
    }
    SUBCASE("not a model file") {
        check_refused(run("./generate --checkpoint " + q(tok512())), {"tok512.model", "header"});
    }
    SUBCASE("negative temperature") {
        check_refused(run(generate("--temperature -1")), {"--temperature", "-1"});
    }
    SUBCASE("top-p 0") {
        check_refused(run(generate("--top-p 0")), {"--top-p"});
    }
    SUBCASE("top-p 1.5") {
        check_refused(run(generate("--top-p 1.5")), {"--top-p", "1.5"});
    }
    SUBCASE("no new tokens") {
        check_refused(run(generate("--max-new-tokens 0")), {"--max-new-tokens"});
    }
    SUBCASE("unknown device") {
        check_refused(run(generate("--device gpu")), {"--device", "gpu"});
    }
    SUBCASE("--device cuda without a GPU") {
        if (exists("/dev/nvidiactl")) {
            MESSAGE("a GPU device node is present: the no-GPU refusal of --device cuda is not tested here");
        } else {
            Run r = run(generate("--device cuda"));
            check_refused(r, {"--device cuda"});
            CHECK_MESSAGE((has(r.err, "no CUDA device") || has(r.err, "no CUDA backend")), r.err);
        }
    }
    SUBCASE("empty prompt") {
        check_refused(run(generate("--prompt ''")), {"--prompt", "empty"});
    }
    SUBCASE("prompt longer than the context") {
        std::string text;
        for (int i = 0; i < 100; i++) text += "The dog ran to the park with a red ball. ";
        Run r = run(generate("--prompt " + q(text)));
        check_refused(r, {"--prompt", "context is 512 tokens"});
        CHECK(r.out.empty());
    }
    SUBCASE("threads not a number") {
        check_refused(run(generate("--threads abc")), {"--threads", "abc"});
    }
    SUBCASE("negative threads: the range, once") {
        check_refused(run(generate("--threads -1")), {"--threads: Value -1 not in range 0 to 4096"});
    }
    // Found by fuzzing: CLI::Range passes NaN (every comparison is false), so "nan" sampled garbage.
    SUBCASE("temperature and top-p must be finite") {
        check_refused(run(generate("--temperature nan")), {"--temperature", "nan is not a finite number"});
        check_refused(run(generate("--top-p nan")), {"--top-p", "nan is not a finite number"});
    }
    // Found by fuzzing: --seed -1 wrapped to 2^64 - 1 and seeds past 2^64 - 1 saturated to it.
    SUBCASE("seed must be a 64-bit unsigned integer") {
        check_refused(run(generate("--seed -1")), {"--seed", "-1 is not an integer in [0, 18446744073709551615]"});
        check_refused(run(generate("--seed 18446744073709551616")), {"--seed", "18446744073709551616"});
        Run r = run(generate("--seed 18446744073709551615 --max-new-tokens 2"));
        CHECK_MESSAGE(r.rc == 0, r.err);
        CHECK_MESSAGE(has(r.err, "seed 18446744073709551615"), r.err);
    }
    SUBCASE("perplexity file missing") {
        check_refused(run(generate("--perplexity /no/such/story.txt")), {"--perplexity", "/no/such/story.txt"});
    }
    SUBCASE("unknown flag") {
        check_refused(run(generate("--tempreature 0")), {"--tempreature"});
    }
}

TEST_CASE("quantize: misuse exits non-zero, names the problem, and writes nothing") {
    std::string out = temp_dir() + "/refused.bin";
    SUBCASE("missing input") {
        std::string in = temp_dir() + "/no-such-checkpoint.bin";
        check_refused(run("./quantize --input " + q(in) + " --output " + q(out)), {"--input", in});
    }
    SUBCASE("unknown mode") {
        check_refused(run("./quantize --mode int3 --input " + q(models_dir() + "/stories260K.bin") + " --tokenizer " +
                          q(tok512()) + " --output " + q(out)),
                      {"--mode", "int3"});
    }
    SUBCASE("output that is not a regular file") {
        // Found by fuzzing: --output /dev/null replaced the device node with the model (as root).
        std::string pipe = temp_dir() + "/pipe";
        std::remove(pipe.c_str());
        REQUIRE(mkfifo(pipe.c_str(), 0600) == 0);
        check_refused(run("./quantize --input " + q(models_dir() + "/stories260K.bin") + " --tokenizer " + q(tok512()) +
                          " --output " + q(pipe)),
                      {"--output", "not a regular file", pipe});
        struct stat st;
        REQUIRE(stat(pipe.c_str(), &st) == 0);
        CHECK(S_ISFIFO(st.st_mode));
    }
    SUBCASE("llama2.c input without --tokenizer") {
        check_refused(run("./quantize --input " + q(models_dir() + "/stories260K.bin") + " --output " + q(out)),
                      {"stories260K.bin", "--tokenizer"});
    }
    SUBCASE("output folder does not exist") {
        std::string o = temp_dir() + "/no-such-folder/model.bin";
        check_refused(run("./quantize --input " + q(models_dir() + "/stories260K.bin") + " --tokenizer " +
                          q(tok512()) + " --output " + q(o)),
                      {"output directory does not exist"});
        CHECK_FALSE(exists(o));
    }
    CHECK_FALSE(exists(out));
    CHECK_FALSE(exists(out + ".tmp"));
}

}  // TEST_SUITE

TEST_CASE("generate: speculative decoding flags") {
    std::string xs = temp_dir() + "/llama2xs.bin";
    Run c = run("./quantize -q --input " + q(models_dir() + "/llama2xs_tok512.bin") + " --tokenizer " + q(tok512()) +
                " --output " + q(xs));
    REQUIRE_MESSAGE(c.rc == 0, c.err);
    const std::string args = "--prompt 'Once upon a time' --temperature 0 --max-new-tokens 100";
    Run plain = run(generate(args));
    REQUIRE(plain.rc == 0);

    Run spec = run(generate(args + " --draft_checkpoint_path " + q(xs) + " --speculate_k 4"));
    CHECK_MESSAGE(spec.rc == 0, spec.err);
    CHECK(spec.out == plain.out);
    CHECK(has(spec.err, "speculative: k 4, acceptance"));
    CHECK(has(spec.err, "tokens per target forward"));

    Run ngram = run(generate(args + " --draft ngram --speculate-k 3"));
    CHECK_MESSAGE(ngram.rc == 0, ngram.err);
    CHECK(ngram.out == plain.out);

    SUBCASE("a draft with another vocabulary is refused") {
        Config cfg = tiny_config(32, 64, 1, 4, 2, true);
        cfg.vocab_size = 520;
        std::string other = temp_dir() + "/vocab520.bin";
        write_model_bin(random_weights(cfg, 1), other, DType::F32);
        check_refused(run(generate(args + " --draft-checkpoint " + q(other))), {other, "vocabulary", "520", "512"});
    }
    SUBCASE("--draft model needs a checkpoint; ngram and a checkpoint exclude each other") {
        check_refused(run(generate(args + " --draft model")), {"--draft-checkpoint"});
        check_refused(run(generate(args + " --draft ngram --draft-checkpoint " + q(xs))), {"--draft ngram"});
        check_refused(run(generate(args + " --draft ngram --speculate-k 0")), {"--speculate-k"});
    }
}
