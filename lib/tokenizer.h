// tokenizer: byte-level BPE (Hugging Face tokenizer.json, GPT-2 files, GGUF-style vocab lists),
// SentencePiece models (load and train) and the Qwen3 chat format. No Lua, no ATen.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qatlab {

// The common interface. Ids are 0-based int64. Errors are std::runtime_error naming the file
// (or the function) and the key, with what was expected and what was found.
class Tokenizer {
public:
    virtual ~Tokenizer();
    // add_special_tokens: what the model's post-processor adds (BOS for Llama-3, nothing for
    // Qwen3 and GPT-2; BOS for SentencePiece models that have one). Added tokens written in
    // the text (e.g. "<|im_start|>") are always matched, as Hugging Face does.
    virtual std::vector<int64_t> encode(const std::string & text, bool add_special_tokens = false) const = 0;
    // Invalid UTF-8 in the joined bytes becomes U+FFFD (one per maximal invalid subpart, as
    // Python's errors='replace' and Rust's from_utf8_lossy). Ids out of range throw.
    virtual std::string decode(const std::vector<int64_t> & ids, bool skip_special_tokens = false) const = 0;
    // Number of ids, added tokens included (max id + 1): 151669 for Qwen3, 50257 for GPT-2.
    virtual int64_t vocab_size() const = 0;
    // The token string as the vocabulary spells it ("Ġworld" for byte-level BPE, "▁the" for
    // SentencePiece); -1 when absent.
    virtual int64_t token_to_id(const std::string & token) const = 0;
    virtual std::string id_to_token(int64_t id) const = 0;  // throws when out of range
    // The raw bytes the token stands for ("\x20world"); for bits-per-byte accounting.
    virtual std::string token_bytes(int64_t id) const = 0;
    virtual bool is_special(int64_t id) const = 0;          // skipped by skip_special_tokens
    virtual const char * kind() const = 0;                  // "bpe" or "sentencepiece"

    int64_t bos_token_id() const { return bos_id_; }        // -1 when the model has none
    int64_t eos_token_id() const { return eos_id_; }
    int64_t pad_token_id() const { return pad_id_; }
    int64_t unk_token_id() const { return unk_id_; }

protected:
    int64_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1;
};

// A tokenizer.json, a directory holding tokenizer.json (else tokenizer.model), or a
// SentencePiece .model file.
std::unique_ptr<Tokenizer> tokenizer_load(const std::string & path);

// -- byte-level BPE ----------------------------------------------------------------------

// A vocabulary given as lists, as GGUF files carry it (tokenizer.ggml.model = "gpt2").
struct BpeVocab {
    // tokenizer.ggml.tokens: id = index. Normal tokens are spelled in GPT-2's byte-to-unicode
    // alphabet ("Ġthe"); control and user-defined tokens are their literal text ("<|im_end|>").
    std::vector<std::string> tokens;
    // tokenizer.ggml.merges: "left right" (one space), highest priority first.
    std::vector<std::string> merges;
    // tokenizer.ggml.token_type, optional (empty: all normal): 1 normal, 2 unknown, 3 control
    // (a special added token), 4 user-defined (a non-special added token), 5 unused, 6 byte.
    // Control and user-defined tokens are matched in the text before pre-tokenization.
    std::vector<int32_t> token_types;
    // tokenizer.ggml.pre: the pre-tokenizer. Supported: "gpt2" (also "default", "mpt", "olmo"),
    // "llama-bpe" (also "llama3", "llama-v3", "dbrx", "smaug-bpe"), "qwen2" (also "stablelm2",
    // "deepseek-r1-qwen"; NFC-normalized, as Hugging Face's Qwen tokenizers are), "smollm"
    // (also "starcoder", "refact", "command-r", "codeshell": digits split one by one, then
    // GPT-2's regex).
    std::string pre = "gpt2";
    // tokenizer.ggml.{bos,eos,padding,unknown}_token_id, tokenizer.ggml.add_{bos,eos}_token.
    int64_t bos_id = -1, eos_id = -1, pad_id = -1, unk_id = -1;
    bool add_bos = false, add_eos = false;
    std::string source = "vocab";  // names the origin in error messages (e.g. the .gguf path)
};

class BpeTokenizer : public Tokenizer {
public:
    // A Hugging Face tokenizer.json (or a directory holding one). Reads tokenizer_config.json
    // next to it, when present, for bos/eos/pad/unk and add_bos_token/add_eos_token.
    // Supported: normalizer null/NFC/NFD/NFKC/NFKD/Sequence; pre_tokenizer Sequence of
    // Split (Regex or String pattern, any behavior, invert), ByteLevel, Digits; model BPE
    // (merges as "a b" or [a, b]; ignore_merges); post_processor ByteLevel, TemplateProcessing,
    // RobertaProcessing, BertProcessing, Sequence; decoder ByteLevel (or null).
    static std::unique_ptr<BpeTokenizer> from_json(const std::string & path);
    // OpenAI's GPT-2 files: encoder.json (token → id) and vocab.bpe (merges). <|endoftext|>
    // is a special added token and the bos/eos id, as in Hugging Face's gpt2 tokenizer.
    static std::unique_ptr<BpeTokenizer> from_gpt2_files(const std::string & encoder_json,
                                                         const std::string & vocab_bpe);
    static std::unique_ptr<BpeTokenizer> from_vocab(const BpeVocab & vocab);
    ~BpeTokenizer() override;

    std::vector<int64_t> encode(const std::string & text, bool add_special_tokens = false) const override;
    std::string decode(const std::vector<int64_t> & ids, bool skip_special_tokens = false) const override;
    int64_t vocab_size() const override;
    int64_t token_to_id(const std::string & token) const override;
    std::string id_to_token(int64_t id) const override;
    std::string token_bytes(int64_t id) const override;
    bool is_special(int64_t id) const override;
    const char * kind() const override { return "bpe"; }

    // Appends the ids of `text` to `out` (no special tokens added); the allocation-free form.
    void encode_into(const char * text, size_t len, std::vector<int64_t> & out) const;

    struct Impl;

private:
    explicit BpeTokenizer(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

// -- SentencePiece -----------------------------------------------------------------------

class SentencePieceTokenizer : public Tokenizer {
public:
    static std::unique_ptr<SentencePieceTokenizer> from_file(const std::string & model_path);
    ~SentencePieceTokenizer() override;

    // add_special_tokens prepends BOS when the model has one (as Llama's tokenizer does).
    std::vector<int64_t> encode(const std::string & text, bool add_special_tokens = false) const override;
    // skip_special_tokens also drops unknown pieces (control pieces decode to nothing anyway).
    std::string decode(const std::vector<int64_t> & ids, bool skip_special_tokens = false) const override;
    int64_t vocab_size() const override;
    int64_t token_to_id(const std::string & piece) const override;
    std::string id_to_token(int64_t id) const override;
    std::string token_bytes(int64_t id) const override;  // "▁" → " ", <0xAB> → the byte
    bool is_special(int64_t id) const override;           // control or unknown
    const char * kind() const override { return "sentencepiece"; }

    struct Impl;

private:
    explicit SentencePieceTokenizer(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

struct SentencePieceTrainOptions {
    std::string input;          // a text file, one sentence per line
    std::string model_prefix;   // writes <prefix>.model and <prefix>.vocab
    int64_t vocab_size = 1024;
    std::string model_type = "bpe";  // bpe, unigram, char, word
    // Any other trainer flag by its spm_train name ("character_coverage" → "0.999",
    // "byte_fallback" → "true", ...). minloglevel defaults to 1 (quiet).
    std::map<std::string, std::string> extra;
};

// The SentencePiece kwargs of parameter-golf's tokenizer_specs (docs/formulas.md §10):
// bpe, character_coverage 0.999, byte_fallback, split_digits, nmt_nfkc, no dummy prefix,
// pad 0 / bos 1 / eos 2 / unk 3, hard_vocab_limit false. Merge into `extra`.
std::map<std::string, std::string> sentencepiece_golf_options();

// Trains into temporary names next to the prefix, then renames: a failed or interrupted
// run leaves no half-written <prefix>.model. Returns the .model path.
std::string sentencepiece_train(const SentencePieceTrainOptions & opts);

// -- chat format -------------------------------------------------------------------------

struct ChatMessage {
    std::string role;     // system, user, assistant, tool
    std::string content;
    std::optional<std::string> reasoning_content;  // assistant thinking, when given apart
};

struct ChatFormatOptions {
    bool add_generation_prompt = false;
    // false: the seed's cache builder (docs/formulas.md §10): the template is rendered, then every
    // <think>…</think> block and the whitespace after it is removed; a generation prompt gets
    // the empty "<think>\n\n</think>\n\n" block, as Qwen3's template does.
    bool enable_thinking = false;
    // false: skip the removal, giving exactly Hugging Face's apply_chat_template output.
    bool strip_think = true;
};

// Qwen3's chat template (tokenizer_config.json of Qwen3, without tools): <|im_start|>role\n
// content<|im_end|>\n per message; the last assistant turn after the last user query gets a
// <think> block (empty when no reasoning is given).
std::string chat_format_qwen3(const std::vector<ChatMessage> & messages, const ChatFormatOptions & opts = {});

// A model's own chat template, recognised by family from distinctive markers in its Jinja text
// and rendered in C++. Families: "qwen3" (the function above; thinking
// modes and strip_think apply), "chatml" (<|im_start|>role\ncontent<|im_end|>\n, with the default
// system message a template such as SmolLM2's inserts when the conversation has none), "llama3"
// (bos, <|start_header_id|>role<|end_header_id|>\n\n trimmed content <|eot_id|>). chatml and
// llama3 ignore enable_thinking and strip_think (their templates have no thinking block).
struct ChatTemplate {
    std::string family;                 // "qwen3", "chatml" or "llama3"
    std::string source;                 // where the text came from, for errors
    std::string text;                   // the Jinja text ("" when chosen by name)
    bool has_default_system = false;    // chatml: insert default_system when messages[1] is not system
    std::string default_system;
    std::string bos_token = "<|begin_of_text|>";   // llama3: written before the first message
};

// The known family names, for error messages: "qwen3, chatml, llama3".
const char * chat_template_families();
// Recognises `text`; throws "<source>: chat template not recognised ..." naming the known families.
ChatTemplate chat_template_parse(const std::string & text, const std::string & source);
// A family by name ("qwen3", "chatml", "llama3"), else `name_or_text` parsed as template text.
ChatTemplate chat_template_named(const std::string & name_or_text);
// Renders as Hugging Face's apply_chat_template on the same template text (no tools).
std::string chat_template_render(const ChatTemplate & t, const std::vector<ChatMessage> & messages,
                                 const ChatFormatOptions & opts = {});
// The template a tokenizer file or folder ships: <dir>/chat_template.jinja, else the
// chat_template of <dir>/tokenizer_config.json (a string, or a list of {name, template} whose
// "default" entry is taken); <dir> is the path itself or its parent. {text, source}, or
// nullopt when there is none.
std::optional<std::pair<std::string, std::string>> chat_template_find(const std::string & tokenizer_path);

} // namespace qatlab
