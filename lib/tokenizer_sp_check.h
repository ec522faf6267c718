// tokenizer_sp_check: validates a SentencePiece ModelProto's bytes before libsentencepiece sees
// them (the library trusts the normalizer's precompiled charsmap and reads out of bounds on a bad one).
#pragma once
#include <string>
#include <string_view>

namespace qatlab {

// Throws std::runtime_error "<path>: <what is wrong>" unless `bytes` is a well-formed ModelProto
// whose pieces are named and whose normalizer and denormalizer charsmaps keep every offset the
// library follows in bounds, whatever text is later encoded or decoded.
void sentencepiece_model_check(std::string_view bytes, const std::string & path);

// Checks one precompiled charsmap blob (NormalizerSpec.precompiled_charsmap); throws a message
// without the path ("<what>: ...").
void sentencepiece_charsmap_check(std::string_view blob, const char * what);

} // namespace qatlab
