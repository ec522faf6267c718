#!/usr/bin/env python3
# make_corpus: writes the seed corpora of the tools/fuzz targets (small files made here, never real
# models): python3 tools/fuzz/make_corpus.py OUT_DIR. Needs torch, safetensors, tokenizers, gguf;
# the SentencePiece seeds need spm_train (Debian's sentencepiece). A missing piece skips its seeds.
import json
import os
import shutil
import random
import struct
import subprocess
import sys
import tempfile

out = sys.argv[1]
rng = random.Random(15)


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def skip(what, e):
    print(f'make_corpus: {what} seeds skipped: {e}', file=sys.stderr)


def read(path):
    with open(path, 'rb') as f:
        return f.read()


tmp = tempfile.mkdtemp(prefix='qatlab-corpus-')

# -- safetensors (written by hand: the format is a length, a JSON header, the bytes) ----------------
def st_bytes(tensors, metadata=None):
    header, blob = {}, b''
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [len(blob), len(blob) + len(raw)]}
        blob += raw
    if metadata is not None:
        header['__metadata__'] = metadata
    h = json.dumps(header).encode()
    h += b' ' * (-len(h) % 8)
    return struct.pack('<Q', len(h)) + h + blob

put('safetensors', 'f32', st_bytes({'w': ('F32', [2, 3], struct.pack('<6f', *range(6)))}))
put('safetensors', 'mixed', st_bytes({
    'a': ('F16', [4], struct.pack('<4e', 1, -2, 0.5, 65504)),
    'b': ('BF16', [2], b'\x80\x3f\x00\x40'),
    'c': ('I64', [1, 1], struct.pack('<q', -7)),
    'd': ('U8', [3], b'\x01\x02\xff'),
    'e': ('BOOL', [2], b'\x01\x00'),
    'f': ('I32', [], struct.pack('<i', 5)),
    'g': ('F64', [0, 4], b''),
}, {'format': 'pt'}))
try:
    import torch
    from safetensors.torch import save as st_save
    put('safetensors', 'library', st_save({'x': torch.arange(12, dtype=torch.int16).reshape(3, 4),
                                           'y': torch.randn(2, 2, dtype=torch.bfloat16)}, {'k': 'v'}))
except Exception as e:  # noqa: BLE001
    skip('safetensors (library)', e)

# -- torch.save files ---------------------------------------------------------------------------
try:
    import collections
    import io
    import torch

    def pt_bytes(obj):
        b = io.BytesIO()
        torch.save(obj, b)
        return b.getvalue()

    base = torch.arange(8, dtype=torch.float32)
    put('pt', 'state_dict', pt_bytes(collections.OrderedDict(
        [('layer.weight', torch.randn(3, 2)), ('layer.bias', torch.zeros(3, dtype=torch.float16))])))
    put('pt', 'views', pt_bytes({'a': base, 'b': base[2:6], 'c': base.view(2, 4).t(), 'i': torch.tensor([1, 2], dtype=torch.int64)}))
    put('pt', 'checkpoint', pt_bytes({'model_state_dict': {'w': torch.ones(2, 2, dtype=torch.bfloat16)}, 'step': 3,
                                      'loss': 1.5, 'name': 'run', 'flags': [True, None, (1, 2.0, 'x')],
                                      'big': 2 ** 70, 'bytes': b'\x00\x01'}))
    put('pt', 'list', pt_bytes([torch.tensor(1.0), torch.zeros(0), torch.tensor([True, False])]))
    # A KD cache shard as the seed writes it (.pt), also used by fuzz_kd_cache.
    n, L, K = 2, 5, 3
    shard_pt = pt_bytes({'input_ids': torch.randint(0, 50, (n, L), dtype=torch.int32),
                         'attention_mask': torch.ones(n, L, dtype=torch.uint8),
                         'topk_idx': torch.randint(0, 50, (n, L - 1, K), dtype=torch.int32),
                         'topk_logits': torch.randn(n, L - 1, K).to(torch.float16)})
    put('pt', 'kd_shard', shard_pt)
except Exception as e:  # noqa: BLE001
    skip('pt', e)
    shard_pt = None

# -- KD cache: meta.json NUL shard ------------------------------------------------------------
def kd_meta(L, K, R, **extra):
    m = {'format': 'qwen_kd_topk_cache_v1', 'max_length': L, 'topk': K, 'rand_neg': R, 'vocab_size': 50,
         'num_sequences': 2, 'teacher_model': 'tiny'}
    m.update(extra)
    return json.dumps(m).encode()

def kd_shard(n, L, K, R):
    S = L - 1
    t = {'input_ids': ('I32', [n, L], struct.pack(f'<{n * L}i', *[rng.randrange(50) for _ in range(n * L)])),
         'attention_mask': ('U8', [n, L], b'\x01' * (n * L)),
         'topk_idx': ('I32', [n, S, K], struct.pack(f'<{n * S * K}i', *[rng.randrange(50) for _ in range(n * S * K)])),
         'topk_logits': ('F16', [n, S, K], struct.pack(f'<{n * S * K}e', *[rng.uniform(-5, 5) for _ in range(n * S * K)]))}
    if R:
        t['rand_idx'] = ('I32', [n, S, R], struct.pack(f'<{n * S * R}i', *[rng.randrange(50) for _ in range(n * S * R)]))
        t['rand_logits'] = ('F16', [n, S, R], struct.pack(f'<{n * S * R}e', *[rng.uniform(-5, 5) for _ in range(n * S * R)]))
    return st_bytes(t)

put('kd_cache', 'plain', kd_meta(5, 3, 0) + b'\0' + kd_shard(2, 5, 3, 0))
put('kd_cache', 'rand', kd_meta(4, 2, 2) + b'\0' + kd_shard(4, 4, 2, 2))
put('kd_cache', 'no_mask', kd_meta(3, 1, 0, top_k=1) + b'\0' + st_bytes({
    'input_ids': ('I64', [3], struct.pack('<3q', 1, 2, 3)),
    'topk_idx': ('I32', [2, 1], struct.pack('<2i', 4, 5)),
    'topk_logits': ('F32', [2, 1], struct.pack('<2f', 0.5, 1.5))}))
if shard_pt:
    put('kd_cache', 'seed_pt', kd_meta(5, 3, 0) + b'\0' + shard_pt)

# -- config.json --------------------------------------------------------------------------------
for name, cfg in {
    'qwen3': {'model_type': 'qwen3', 'vocab_size': 97, 'hidden_size': 32, 'intermediate_size': 64,
              'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16,
              'rms_norm_eps': 1e-6, 'rope_theta': 1e6, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
              'rope_scaling': None, 'max_position_embeddings': 4096, 'architectures': ['Qwen3ForCausalLM']},
    'llama': {'model_type': 'llama', 'vocab_size': 49152, 'hidden_size': 576, 'intermediate_size': 1536,
              'num_hidden_layers': 30, 'num_attention_heads': 9, 'num_key_value_heads': 3, 'attention_bias': False,
              'mlp_bias': False, 'hidden_act': 'silu', 'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e5}},
    'gpt': {'model_type': 'qatlab_gpt', 'vocab_size': 1024, 'hidden_size': 64, 'intermediate_size': 256,
            'num_hidden_layers': 2, 'num_attention_heads': 2, 'logit_softcap': 30.0, 'mlp_act': 'relu2',
            'qk_norm': True, 'embed_norm': True, 'norm_weight': False},
}.items():
    put('config', name, json.dumps(cfg))

# -- tokenizer.json (trained here) NUL text ------------------------------------------------------
texts = ['Hello world! The quick brown fox jumps over the lazy dog 1234567890.',
         'caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 tabs\tand\nnewlines   spaces',
         'def f(x):\n    return x ** 2  # comment\n']
try:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers, Regex
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>', '<|im_end|>'],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    put('tokenizer_json', 'bytelevel', tk.to_str().encode() + b'\0' + texts[0].encode())
    # Qwen-style: NFC, a Split regex then ByteLevel without its own regex, a template post-processor.
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                             behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.post_processor = processors.TemplateProcessing(single='<|endoftext|> $A', pair='$A $B',
                                                      special_tokens=[('<|endoftext|>', tk.token_to_id('<|endoftext|>'))])
    put('tokenizer_json', 'qwen_style', tk.to_str().encode() + b'\0' + texts[1].encode())
    # Regression (fuzz_tokenizer_json): a post-processor whose special token id is in no table made encode
    # emit an id that id_to_token and decode then refused.
    j = json.loads(tk.to_str())
    j['post_processor']['special_tokens']['<|endoftext|>']['ids'] = [tk.get_vocab_size() + 7]
    put('tokenizer_json', 'regress_template_id', json.dumps(j).encode() + b'\0' + texts[0].encode())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=True)])
    put('tokenizer_json', 'digits', tk.to_str().encode() + b'\0' + texts[2].encode())
except Exception as e:  # noqa: BLE001
    skip('tokenizer.json', e)

# -- GGUF: a tiny llama with a gpt2 tokenizer, and the block target's (type, rows, bytes) inputs ----
try:
    import gguf
    import numpy as np
    path = os.path.join(tmp, 'tiny.gguf')
    w = gguf.GGUFWriter(path, 'llama')
    V, H, F, nh = 16, 32, 64, 2
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(nh)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    toks = ['<s>', '</s>'] + [chr(0x100 + i) if i < 4 else 'abcdefghijkl'[i - 4] for i in range(12)] + ['ab', 'Ġa']
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('smollm')
    w.add_token_list(toks)
    w.add_token_types([3, 3] + [1] * 14)
    w.add_token_merges(['a b', 'Ġ a'])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_array('general.tags', [1, 2, 3])
    r = np.random.default_rng(15)
    w.add_tensor('token_embd.weight', r.standard_normal((V, H)).astype(np.float16))
    w.add_tensor('blk.0.attn_q.weight', r.standard_normal((H, H)).astype(np.float32))
    w.add_tensor('blk.0.attn_norm.weight', np.ones(H, dtype=np.float32))
    for qt in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        try:
            x = r.standard_normal((2, 64)).astype(np.float32)
            w.add_tensor(f'blk.0.ffn_{qt.name.lower()}.weight', gguf.quants.quantize(x, qt), raw_dtype=qt)
        except Exception as e:  # noqa: BLE001
            skip(f'gguf {qt.name}', e)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    put('gguf', 'tiny_llama', read(path))
except Exception as e:  # noqa: BLE001
    skip('gguf', e)

# fuzz_gguf_blocks: byte 0 picks the type (index into its table of 15), byte 1 the rows; the rest are
# block bytes, random (two blocks' worth).
block_sizes = [4, 2, 2, 18, 20, 22, 24, 34, 84, 110, 144, 176, 210, 18, 136]
for i, size in enumerate(block_sizes):
    body = bytearray(rng.randrange(256) for _ in range(size * 2))
    put('gguf_blocks', f'type{i}', bytes([i, 1]) + bytes(body))

# -- SentencePiece models (spm_train), unigram and BPE -------------------------------------------
try:
    txt = os.path.join(tmp, 'sp.txt')
    with open(txt, 'w') as f:
        for i in range(200):
            f.write(texts[i % 3].replace('\n', ' ') + f' line {i}\n')
    # Small normalizers keep the models small (the default nmt_nfkc charsmap alone is 240 KB): a few
    # rules of our own (a real charsmap: double array + replacement strings), and none.
    rules = os.path.join(tmp, 'rules.tsv')
    with open(rules, 'w') as f:
        f.write('41\t61\n42\t62\nFF21\t41\n2460\t31\n3000\t20\nFB01\t66 69\n')
    for kind, vocab, flags in (('unigram', 100, ['--normalization_rule_tsv=' + rules]),
                               ('bpe', 350, ['--byte_fallback=true', '--normalization_rule_tsv=' + rules]),
                               ('unigram_identity', 100, ['--normalization_rule_name=identity'])):
        prefix = os.path.join(tmp, kind)
        subprocess.run(['spm_train', f'--input={txt}', f'--model_prefix={prefix}', f'--vocab_size={vocab}',
                        f'--model_type={kind.split("_")[0]}', '--hard_vocab_limit=false', '--minloglevel=2'] + flags,
                       check=True, capture_output=True)
        put('sp', kind, read(prefix + '.model'))
except Exception as e:  # noqa: BLE001
    skip('sentencepiece', e)

# -- regressions: inputs the fuzzers found, rebuilt here byte by byte and kept as seeds (every smoke run
# executes them under ASan/UBSan/LSan) ---------------------------------------------------------------
def pb_bytes(field, payload):  # a length-delimited protobuf field (lengths < 128)
    return bytes([field << 3 | 2, len(payload)]) + payload

# A piece spelled as one NUL byte: darts-clone throws ("zero-length key") inside the library's Load, and
# lib/sp/sp_module.cpp leaked the half-loaded processor.
unk = pb_bytes(1, b'<unk>') + b'\x15\x00\x00\x00\x00' + b'\x18\x02'   # piece, score 0, type UNKNOWN
put('sp', 'regress_nul_piece', pb_bytes(1, unk) + pb_bytes(1, pb_bytes(1, b'\x00')))

# A whole number beyond int64 written without a decimal point (JSON parses it as a float): config.json's
# integer reader cast it to int64, which is undefined (UBSan in fuzz_config).
put('config', 'regress_huge_int', '{"model_type": "qwen3", "vocab_size": 97, "hidden_size": ' + '3' + '25' * 31 + ', '
    '"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}')

shutil.rmtree(tmp, ignore_errors=True)
