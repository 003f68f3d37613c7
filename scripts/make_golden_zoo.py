#!/usr/bin/env python3
"""Make golden fixtures for four more tiny architectures with Hugging Face transformers.

What it makes
-------------
Four tiny, randomly initialised models and the outputs transformers computes for
them, so the Rust forward passes can be checked against a reference.  Every
folder holds ``config.json`` + ``model.safetensors`` (``save_pretrained``
output, one float32 file) + ``tokenizer.json`` + ``golden.safetensors`` +
``golden.json`` (for humans); the three decoders also get the
``generation_config.json`` that ``save_pretrained`` writes for causal LMs.

``tests/fixtures/bloom-tiny/``
    ``BloomForCausalLM``: vocab 320, hidden 48, n_head 6 (head_dim 8; NOT a
    power of two, so the ALiBi slopes use the interpolation branch), n_layer 2,
    layer_norm_epsilon 1e-5, tie_word_embeddings True (Bloom's default: no
    ``lm_head.weight`` in the file, the logits use
    ``transformer.word_embeddings.weight``).
``tests/fixtures/gpt2-tiny/``
    ``GPT2LMHeadModel``: vocab 320, n_embd 64, n_head 4 (head_dim 16), n_layer
    2, n_positions 64, n_inner None (= 4 * 64 = 256), activation "gelu_new",
    layer_norm_epsilon 1e-5, tie_word_embeddings True (GPT-2's default: no
    ``lm_head.weight`` in the file).  GPT-2's ``Conv1D`` weights are stored
    ``[in, out]`` (``y = x @ W + b``), e.g. ``c_attn.weight`` is [64, 192].
``tests/fixtures/qwen2-tiny/``
    ``Qwen2ForCausalLM``: vocab 320, hidden 64, intermediate 176, 2 layers, 4
    heads, 2 KV heads (head_dim 16), rope theta 1e6, rms_norm_eps 1e-6,
    max_position_embeddings 128, tie_word_embeddings False, q/k/v projections
    WITH biases (o_proj and the MLP have none).
``tests/fixtures/bert-tiny/``
    ``BertModel`` (encoder only, plus the pooler transformers creates): hidden
    64, 2 layers, 4 heads, intermediate 128, max_position_embeddings 64,
    type_vocab_size 2, layer_norm_eps 1e-12, hidden_act "gelu" (exact erf
    GELU), pad_token_id 0, vocab = the WordPiece tokenizer's size.

Init (all models, see ``init_weights_``): parameters are visited in sorted name
order from one seeded generator.  LayerNorm / RMSNorm weights uniform [0.9,
1.1]; LayerNorm biases and every other bias normal(0, 0.05) (so a forgotten bias
or a LayerNorm without its affine part shows up); embeddings, lm_head and all
projections normal(0, std) with std per model (``MODELS`` below).  All weights
are stored as float32.

Tokenizers
----------
The decoders reuse ``tests/fixtures/llama-tiny/tokenizer.json`` (byte-level BPE,
vocab 320, ``<|bos|>`` = 0, ``<|eos|>`` = 1, see make_golden_llama.py); the
configs say bos_token_id 0, eos_token_id 1, pad_token_id null.

BERT: a WordPiece tokenizer built with ``tokenizers`` from a vocabulary of 300
learnt here on BERT_TRAIN_TEXT (``learn_wordpiece_vocab``: the BPE-style
procedure of ``tokenizers``' WordPieceTrainer, re-implemented because that
trainer breaks count ties in HashMap order and gives a different vocabulary in
every process).  BertNormalizer(lowercase=True, clean_text=True,
handle_chinese_chars=True, strip_accents=None -- i.e. accents are stripped
because lowercase is on, "naïve" -> "naive"), BertPreTokenizer, WordPiece model
(continuing_subword_prefix "##", unk_token "[UNK]", max_input_chars_per_word
100, greedy longest-match-first), WordPiece decoder (prefix "##"),
TemplateProcessing post-processor single "[CLS] $A [SEP]", pair
"[CLS] $A [SEP] $B:1 [SEP]:1".  Special tokens (also registered as added
tokens) [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the sorted
alphabet (``##x`` continuation forms sort before punctuation / letters), then
the learnt merges.  No padding / truncation configured in tokenizer.json (the
script pads by hand).  The three golden sentences contain no [UNK].

Golden tensors (``golden.safetensors``), all float32 compute with
``attn_implementation="eager"``, ``model.eval()``, ``torch.no_grad()`` on the
model reloaded from the saved folder
--------------------------------------------------------------------------

Decoders (bloom-tiny, gpt2-tiny, qwen2-tiny) -- exactly the llama-tiny layout:

``p{i}.input_ids``       int64  [len]         PROMPTS[i] encoded, add_special_tokens=False (no BOS)
``p{i}.prefill_logits``  f32    [len, vocab]  one forward pass over the whole prompt
``p{i}.generated_ids``   int64  [6]           greedy tokens
``p{i}.decode_logits``   f32    [6, vocab]    logits of each KV-cached decode step
``batch.input_ids``      int64  [2, L]        prompts 0 and 1 truncated to L = the shorter length
``batch.prefill_logits`` f32    [2, L, vocab] one forward pass over that batch, no padding, no mask

Greedy decode convention (step by step with the KV cache from the previous call,
``use_cache=True``, not ``generate()``; the forward kwarg is ``cache`` in
transformers 5.24): ``generated_ids[0] = argmax(prefill_logits[-1])``;
``decode_logits[t]`` is the output of the step that FEEDS ``generated_ids[t]``
(at position len + t), so ``argmax(decode_logits[t]) == generated_ids[t + 1]``
for t < 5.

BERT (bert-tiny):

``batch.input_ids``          int64 [3, L]      SENTENCES tokenized WITH special tokens, right-padded with [PAD]=0 to the longest
``batch.attention_mask``     int64 [3, L]      1 for real tokens, 0 for padding
``batch.token_type_ids``     int64 [3, L]      all zeros
``batch.last_hidden_state``  f32   [3, L, 64]
``batch.pooler_output``      f32   [3, 64]     tanh(pooler.dense(last_hidden_state[:, 0])) (extra, checks the pooler)
``batch.sentence_embedding`` f32   [3, 64]     mean of last_hidden_state over positions with mask == 1
                                               ([CLS] and [SEP] included), then L2-normalised
``s{i}.input_ids``           int64 [len_i]     sentence i alone, with special tokens, no padding
``s{i}.last_hidden_state``   f32   [len_i, 64] sentence i alone (no mask, token_type_ids zeros)

Checks the script makes
-----------------------
* decoders: KV-cached decode logits == one full forward over prompt + generated
  tokens (1e-5), batch rows == single-prompt runs (1e-5), every greedy step's
  top-1 / top-2 margin >= 0.02 (the seeds in MODELS were picked so), and the
  generated tokens are not all the same token;
* BERT: padded rows == unpadded runs at the unmasked positions (1e-5);
* every model: an independent float64 numpy forward pass (written from the
  architecture descriptions, not from transformers' code paths) reproduces all
  golden logits / hidden states (max abs diff printed, asserted <= 1e-4).  These
  encode the conventions a reimplementation needs:
  - BLOOM: embeddings -> word_embeddings_layernorm; fused
    ``query_key_value`` output is laid out per head as [head][q|k|v][head_dim]
    (NOT [q|k|v] blocks); ALiBi bias = slope_h * key_position added to the
    scaled q.k scores (equivalent to -slope_h * (i - j) under softmax); slopes
    for 6 heads: [2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3] (the 4 power-of-two
    slopes, then every other slope of the 8-head series); GELU is the tanh
    approximation; no position embeddings; final ln_f; tied head.
  - GPT-2: wte + wpe; pre-LN blocks (ln_1, attn, ln_2, mlp); ``c_attn`` output
    is [q|k|v] blocks of n_embd each; Conv1D weights [in, out]; gelu_new =
    tanh approximation; final ln_f; tied head.
  - Qwen2: Llama layout + q/k/v biases; RoPE non-interleaved ("rotate_half",
    pairs (i, i + head_dim/2)), theta 1e6; GQA head h uses KV head h // 2.
  - BERT: word + position + token_type embeddings -> LayerNorm; post-LN blocks;
    padded keys masked out; exact erf GELU; pooler = tanh(dense(h[CLS])).

How to rerun
------------
Needs only PyPI packages (no model hub access)::

    python3 -m venv /tmp/goldenv
    /tmp/goldenv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
    HF_HUB_OFFLINE=1 /tmp/goldenv/bin/python scripts/make_golden_zoo.py

(writes to ``tests/fixtures`` under the parent of this script's folder, or under
the repository root given as the first argument; needs
``tests/fixtures/llama-tiny/tokenizer.json`` there; the four fixture folders are
deleted and rewritten).  ``--search-seeds`` instead prints the margins for init
seeds 1..12 of every decoder and writes nothing.  Everything is seeded; rerunning
with the same versions reproduces the same bytes.

Versions it was run with: Python 3.11.7, torch 2.15.0+cu132 (CPU),
transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6.

Config forms written by transformers 5.24.0 (see the config.json files):
Bloom writes ``n_head`` / ``n_layer`` / ``hidden_size`` (no head_dim),
``apply_residual_connection_post_layernorm: false``, ``pretraining_tp: 1``,
``slow_but_exact: false``; GPT-2 writes ``n_embd`` / ``n_head`` / ``n_layer`` /
``n_positions`` / ``n_inner: null`` / ``activation_function``; Qwen2 writes
``rope_parameters: {"rope_theta": 1000000.0, "rope_type": "default"}`` (no
top-level rope_theta), ``use_sliding_window: false``, ``sliding_window: null``,
``max_window_layers``, ``layer_types: ["full_attention", ...]`` and no
``head_dim``; the weight dtype key is ``"dtype"``.
"""

import inspect
import json
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file as load_np  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
SEARCH = "--search-seeds" in sys.argv[1:]
REPO = os.path.abspath(ARGS[0] if ARGS else os.path.join(os.path.dirname(__file__), ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
LLAMA_TOKENIZER = os.path.join(FIXTURES, "llama-tiny", "tokenizer.json")

N_DECODE = 6
TOL = 1e-5
NUMPY_TOL = 1e-4
MIN_MARGIN = 0.02
BIAS_STD = 0.05

# Same prompts as make_golden_llama.py.
PROMPTS = [
    "The quick brown fox",
    "Quantization trades accuracy for memory.",
    "a b c 1 2 3",
]

# Per model: weight-init seed and std of embeddings (+ untied lm_head) / projections.
# The stds were raised until greedy decoding stopped just repeating the last input token
# (with a tied head, BLOOM's normalised embeddings dominate the residual stream unless the
# projections are large).  Seeds picked among 1..12 with --search-seeds: every greedy step
# of every prompt has a top-1 / top-2 margin >= 0.02 (bloom 0.060, gpt2 0.066, qwen2 0.148)
# and the greedy tokens vary.  BERT has no greedy steps; its seed is arbitrary.
MODELS = {
    "bloom-tiny": {"seed": 8, "linear_std": 0.5, "embed_std": 0.2},
    "gpt2-tiny": {"seed": 9, "linear_std": 0.15, "embed_std": 0.15},
    "qwen2-tiny": {"seed": 9, "linear_std": 0.08, "embed_std": 0.2},
    "bert-tiny": {"seed": 1, "linear_std": 0.1, "embed_std": 0.1},
}

# ---------------------------------------------------------------------------------------
# BERT tokenizer
# ---------------------------------------------------------------------------------------
BERT_VOCAB_SIZE = 300
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

BERT_TRAIN_TEXT = """\
Sentence embeddings map a piece of text to a single vector. Two sentences that mean
the same thing should get vectors that point in almost the same direction, so the
cosine similarity between them is high. A search engine can then compare a question
with every document and return the closest ones.

The encoder reads the whole sentence at once. Every token looks at every other token
through attention, and the final hidden states are averaged over the real tokens,
ignoring the padding, before the result is normalised to unit length.

Quantization makes the model smaller. Weights stored in eight or four bits need much
less memory than thirty two bit floats, and on many machines the model also runs
faster. The price is a small loss of accuracy, which a benchmark has to measure.

The weather was cold in the morning, but by the afternoon the sun came out and the
children played in the park near the river. Their parents talked about the news,
the prices in the market and the long summer holiday that was about to begin.

Numbers appear in text too: 1, 2, 3, 10, 42, 100 and 2024. Questions end with a
question mark? Yes! Some words are joined with a dash, like state-of-the-art; others
are quoted: "search", 'padding'. A list can use a colon: one; two; three.
"""

SENTENCES = [
    "The cat sat.",
    "Quantization makes the model smaller and faster.",
    "A naïve search engine compares 42 questions with every document, ignoring the padding!",
]


def learn_wordpiece_vocab(words, vocab_size, specials, prefix="##"):
    """Deterministic WordPiece vocabulary learning (the BPE-style procedure that
    ``tokenizers``' WordPieceTrainer uses, but with every tie broken by the token strings).

    ``tokenizers``' WordPieceTrainer is not reproducible here: with this small corpus many
    pairs tie on count and it breaks the ties (and orders the initial alphabet) by Rust
    HashMap iteration order, which changes from process to process.  So the vocabulary is
    learnt here: every word starts as its first character plus ``##``-prefixed following
    characters; ids are the special tokens, then the sorted alphabet, then repeatedly the
    most frequent adjacent pair (ties: lexicographically smallest pair) is merged and the
    merged token appended (if new) until ``vocab_size`` tokens exist.
    """
    from collections import Counter  # noqa: PLC0415
    counts = Counter(words)
    seqs = {w: [w[0]] + [prefix + c for c in w[1:]] for w in counts}
    vocab = list(specials) + sorted({t for seq in seqs.values() for t in seq})
    seen = set(vocab)
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + (b[len(prefix):] if b.startswith(prefix) else b)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    return {t: i for i, t in enumerate(vocab)}


def build_bert_tokenizer():
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(BERT_TRAIN_TEXT))]
    vocab = learn_wordpiece_vocab(words, BERT_VOCAB_SIZE, BERT_SPECIALS)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    for i, s in enumerate(BERT_SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.add_special_tokens(BERT_SPECIALS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    assert tok.get_vocab_size() == BERT_VOCAB_SIZE, tok.get_vocab_size()
    return tok


# ---------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------
def norm_param_names(model):
    """Names of the parameters owned by LayerNorm / RMSNorm modules."""
    names = set()
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, torch.nn.LayerNorm) or cls.endswith("RMSNorm") or cls.endswith("LayerNorm"):
            for pname, _ in mod.named_parameters(recurse=False):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


def init_weights_(model, seed, linear_std, embed_std):
    """Larger-than-default random init, every bias and every norm parameter random.

    Sorted name order, one generator.  Norm weights uniform [0.9, 1.1]; norm biases and all
    other biases normal(0, BIAS_STD); embeddings (word / position / token type) and an
    untied lm_head normal(0, embed_std); every other weight normal(0, linear_std).
    """
    norms = norm_param_names(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name in norms and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * (2.0 * torch.rand(p.shape, generator=g) - 1.0))
            elif name.endswith("bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and ("embed" in name or name.startswith("lm_head")
                                   or name.split(".")[-2] in ("wte", "wpe")):
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(linear_std * torch.randn(p.shape, generator=g))
    # A norm weight must not have been drawn as a plain projection, etc.
    for name in norms:
        assert name.endswith("weight") or name.endswith("bias"), name


# ---------------------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------------------
def has_field(cls, name):
    fields = set(getattr(cls, "__dataclass_fields__", {})) | set(inspect.signature(cls.__init__).parameters)
    return name in fields


def bloom_model(vocab):
    cfg = BloomConfig(
        vocab_size=vocab, hidden_size=48, n_head=6, n_layer=2, layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=True,
        apply_residual_connection_post_layernorm=False, pretraining_tp=1, slow_but_exact=False,
    )
    return BloomForCausalLM, cfg


def gpt2_model(vocab):
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=64, n_head=4, n_layer=2, n_positions=64, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=True,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
    )
    return GPT2LMHeadModel, cfg


def qwen2_model(vocab):
    kw = {}
    if has_field(Qwen2Config, "rope_parameters"):
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    else:
        kw["rope_theta"] = 1e6
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
        use_sliding_window=False, bos_token_id=0, eos_token_id=1, pad_token_id=None, **kw,
    )
    return Qwen2ForCausalLM, cfg


def bert_model(vocab):
    cfg = BertConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
        layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
    )
    return BertModel, cfg


def cache_kw(cls):
    # transformers 5.x renamed the forward kwarg / output field `past_key_values` to `cache`.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def get_cache(out, kw):
    c = getattr(out, "cache", None) if kw == "cache" else None
    return c if c is not None else out.past_key_values


def load_f32(cls, path):
    m = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    assert next(m.parameters()).dtype == torch.float32
    return m


# ---------------------------------------------------------------------------------------
# Decoder goldens
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def decoder_golden(model, tok):
    ckw = cache_kw(type(model))
    tensors = {}
    info = {"prompts": [], "decode_convention": (
        "generated_ids[0] = argmax(prefill_logits[-1]); decode_logits[t] is the output after feeding "
        "generated_ids[t] with the KV cache, so argmax(decode_logits[t]) = generated_ids[t+1]")}
    min_margin = float("inf")
    ids_list, log, diverse = [], [], True
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, (tok.decode(ids), text)
        ids_list.append(ids)
        x = torch.tensor([ids], dtype=torch.int64)
        out = model(input_ids=x, use_cache=True)
        prefill = out.logits[0].float().clone()
        past = get_cache(out, ckw)
        gen, dec = [], []
        nxt = int(prefill[-1].argmax())
        top2 = prefill[-1].topk(2).values
        margins = [float(top2[0] - top2[1])]
        for t in range(N_DECODE):
            gen.append(nxt)
            o = model(input_ids=torch.tensor([[nxt]], dtype=torch.int64), use_cache=True, **{ckw: past})
            past = get_cache(o, ckw)
            row = o.logits[0, -1].float().clone()
            dec.append(row)
            top2 = row.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(row.argmax())
        dec = torch.stack(dec)
        full = model(input_ids=torch.tensor([ids + gen], dtype=torch.int64), use_cache=False).logits[0].float()
        n = len(ids)
        d_pre = (full[:n] - prefill).abs().max().item()
        d_dec = (full[n : n + N_DECODE] - dec).abs().max().item()
        log.append(f"  p{i}: len={n} gen={gen} max|prefill-full|={d_pre:.2e} max|decode-full|={d_dec:.2e} "
                   f"min top1-top2 margin={min(margins):.4f}")
        assert d_pre <= TOL and d_dec <= TOL, (d_pre, d_dec)
        for t in range(N_DECODE - 1):
            assert int(dec[t].argmax()) == gen[t + 1]
        assert int(prefill[-1].argmax()) == gen[0]
        diverse = diverse and len(set(gen)) > 1
        min_margin = min(min_margin, min(margins))
        tensors[f"p{i}.input_ids"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"p{i}.prefill_logits"] = prefill.contiguous()
        tensors[f"p{i}.generated_ids"] = torch.tensor(gen, dtype=torch.int64)
        tensors[f"p{i}.decode_logits"] = dec.contiguous()
        info["prompts"].append({
            "name": f"p{i}",
            "text": text,
            "input_ids": ids,
            "tokens": [tok.id_to_token(t) for t in ids],
            "generated_ids": gen,
            "generated_text": tok.decode(gen),
            "generated_tokens": [tok.id_to_token(t) for t in gen],
            "greedy_margins_top1_minus_top2": [round(m, 6) for m in margins],
        })
    L = min(len(ids_list[0]), len(ids_list[1]))
    bx = torch.tensor([ids_list[0][:L], ids_list[1][:L]], dtype=torch.int64)
    bl = model(input_ids=bx, use_cache=False).logits.float().contiguous()
    for b in range(2):
        d = (bl[b] - tensors[f"p{b}.prefill_logits"][:L]).abs().max().item()
        log.append(f"  batch row {b}: L={L} max|batch-single|={d:.2e}")
        assert d <= TOL, d
    tensors["batch.input_ids"] = bx
    tensors["batch.prefill_logits"] = bl
    info["batch"] = {"prompts": [0, 1], "L": L, "input_ids": bx.tolist()}
    info["min_greedy_margin"] = round(min_margin, 6)
    return tensors, info, min_margin, diverse, log


# ---------------------------------------------------------------------------------------
# BERT goldens
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def bert_golden(model, tok):
    encs = [tok.encode(s) for s in SENTENCES]  # add_special_tokens=True by default
    lens = [len(e.ids) for e in encs]
    assert len(set(lens)) == len(lens), lens
    L = max(lens)
    pad = tok.token_to_id("[PAD]")
    ids = torch.full((len(SENTENCES), L), pad, dtype=torch.int64)
    mask = torch.zeros((len(SENTENCES), L), dtype=torch.int64)
    for i, e in enumerate(encs):
        ids[i, : lens[i]] = torch.tensor(e.ids)
        mask[i, : lens[i]] = 1
    tt = torch.zeros_like(ids)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    h = out.last_hidden_state.float().contiguous()
    m = mask.unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1)
    emb = (mean / mean.norm(dim=-1, keepdim=True)).contiguous()
    tensors = {
        "batch.input_ids": ids,
        "batch.attention_mask": mask,
        "batch.token_type_ids": tt,
        "batch.last_hidden_state": h,
        "batch.pooler_output": out.pooler_output.float().contiguous(),
        "batch.sentence_embedding": emb,
    }
    log = []
    info = {"sentences": [], "padding": "right, with [PAD] = 0, to the longest", "L": L,
            "sentence_embedding": "mean of last_hidden_state over mask == 1 positions ([CLS] and [SEP] "
                                  "included), then divided by its L2 norm",
            "pooler_output": "tanh(pooler.dense(last_hidden_state[:, 0]))"}
    for i, e in enumerate(encs):
        x = torch.tensor([e.ids], dtype=torch.int64)
        hs = model(input_ids=x, token_type_ids=torch.zeros_like(x)).last_hidden_state[0].float().contiguous()
        d = (hs - h[i, : lens[i]]).abs().max().item()
        log.append(f"  s{i}: len={lens[i]} max|padded-unpadded|={d:.2e}")
        assert d <= TOL, d
        tensors[f"s{i}.input_ids"] = torch.tensor(e.ids, dtype=torch.int64)
        tensors[f"s{i}.last_hidden_state"] = hs
        info["sentences"].append({
            "name": f"s{i}",
            "text": SENTENCES[i],
            "input_ids": e.ids,
            "tokens": e.tokens,
            "decoded": tok.decode(e.ids),
        })
    info["batch_input_ids"] = ids.tolist()
    return tensors, info, log


# ---------------------------------------------------------------------------------------
# Independent float64 numpy forwards (checks the goldens and documents the conventions)
# ---------------------------------------------------------------------------------------
def np_ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_gelu_erf(x):
    from scipy.special import erf  # noqa: PLC0415 (only when scipy is there)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v, bias=None):
    """q [H, T, D], k/v [H, T, D]; bias [H, T, T] or None.  Returns [T, H*D]."""
    H, T, D = q.shape
    s = q @ k.transpose(0, 2, 1) / math.sqrt(D)
    if bias is not None:
        s = s + bias
    s = np.where(np.tril(np.ones((T, T), dtype=bool))[None], s, -np.inf)
    return (np_softmax(s) @ v).transpose(1, 0, 2).reshape(T, H * D)


def alibi_slopes(n):
    """ALiBi slopes from the paper's recipe (independent of transformers' code)."""
    def pow2(m):
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]
    c = 2 ** int(math.floor(math.log2(n)))
    return pow2(c) if c == n else pow2(c) + pow2(2 * c)[0::2][: n - c]


def np_bloom(W, cfg, ids):
    H, C = cfg["n_head"], cfg["hidden_size"]
    D, eps = C // H, cfg["layer_norm_epsilon"]
    T = len(ids)
    h = W["transformer.word_embeddings.weight"][ids]
    h = np_ln(h, W["transformer.word_embeddings_layernorm.weight"], W["transformer.word_embeddings_layernorm.bias"], eps)
    slopes = np.array(alibi_slopes(H))
    pos = np.arange(T)
    bias = slopes[:, None, None] * (pos[None, :] - pos[:, None])[None]  # -slope * (i - j)
    for li in range(cfg["n_layer"]):
        p = f"transformer.h.{li}."
        a = np_ln(h, W[p + "input_layernorm.weight"], W[p + "input_layernorm.bias"], eps)
        qkv = a @ W[p + "self_attention.query_key_value.weight"].T + W[p + "self_attention.query_key_value.bias"]
        qkv = qkv.reshape(T, H, 3, D)  # per head: [q | k | v]
        q, k, v = (qkv[:, :, j, :].transpose(1, 0, 2) for j in range(3))
        ctx = causal_attention(q, k, v, bias)
        h = h + ctx @ W[p + "self_attention.dense.weight"].T + W[p + "self_attention.dense.bias"]
        a = np_ln(h, W[p + "post_attention_layernorm.weight"], W[p + "post_attention_layernorm.bias"], eps)
        f = np_gelu_tanh(a @ W[p + "mlp.dense_h_to_4h.weight"].T + W[p + "mlp.dense_h_to_4h.bias"])
        h = h + f @ W[p + "mlp.dense_4h_to_h.weight"].T + W[p + "mlp.dense_4h_to_h.bias"]
    h = np_ln(h, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"], eps)
    return h @ W["transformer.word_embeddings.weight"].T


def np_gpt2(W, cfg, ids):
    H, C = cfg["n_head"], cfg["n_embd"]
    D, eps = C // H, cfg["layer_norm_epsilon"]
    T = len(ids)
    h = W["transformer.wte.weight"][ids] + W["transformer.wpe.weight"][np.arange(T)]
    for li in range(cfg["n_layer"]):
        p = f"transformer.h.{li}."
        a = np_ln(h, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
        qkv = a @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]  # Conv1D: [in, out]
        q, k, v = (qkv[:, j * C : (j + 1) * C].reshape(T, H, D).transpose(1, 0, 2) for j in range(3))
        h = h + causal_attention(q, k, v) @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
        a = np_ln(h, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
        f = np_gelu_tanh(a @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"])
        h = h + f @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]
    h = np_ln(h, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"], eps)
    return h @ W["transformer.wte.weight"].T


def np_rope(x, theta):
    """x [H, T, D], non-interleaved (rotate_half) layout."""
    H, T, D = x.shape
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None]  # [T, D/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_qwen2(W, cfg, ids):
    H, KV, C = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D, eps = C // H, cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"]
    T = len(ids)
    h = W["model.embed_tokens.weight"][ids]
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        a = np_rms(h, W[p + "input_layernorm.weight"], eps)
        q = (a @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]).reshape(T, H, D).transpose(1, 0, 2)
        k = (a @ W[p + "self_attn.k_proj.weight"].T + W[p + "self_attn.k_proj.bias"]).reshape(T, KV, D).transpose(1, 0, 2)
        v = (a @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]).reshape(T, KV, D).transpose(1, 0, 2)
        q, k = np_rope(q, theta), np_rope(k, theta)
        rep = H // KV
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # head h -> kv head h // rep
        h = h + causal_attention(q, k, v) @ W[p + "self_attn.o_proj.weight"].T
        a = np_rms(h, W[p + "post_attention_layernorm.weight"], eps)
        g = a @ W[p + "mlp.gate_proj.weight"].T
        u = a @ W[p + "mlp.up_proj.weight"].T
        h = h + (g / (1.0 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
    h = np_rms(h, W["model.norm.weight"], eps)
    return h @ W["lm_head.weight"].T


def np_bert(W, cfg, ids, mask):
    """ids/mask [T]; returns (last_hidden_state [T, C], pooler [C])."""
    H, C = cfg["num_attention_heads"], cfg["hidden_size"]
    D, eps = C // H, cfg["layer_norm_eps"]
    T = len(ids)
    h = (W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][np.arange(T)]
         + W["embeddings.token_type_embeddings.weight"][np.zeros(T, dtype=np.int64)])
    h = np_ln(h, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    keymask = np.where(np.asarray(mask)[None, None, :] == 1, 0.0, -np.inf)
    for li in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{li}."
        def lin(x, n):
            return x @ W[p + n + ".weight"].T + W[p + n + ".bias"]
        q, k, v = (lin(h, "attention.self." + n).reshape(T, H, D).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(D) + keymask
        ctx = (np_softmax(s) @ v).transpose(1, 0, 2).reshape(T, C)
        h = np_ln(h + lin(ctx, "attention.output.dense"), W[p + "attention.output.LayerNorm.weight"],
                  W[p + "attention.output.LayerNorm.bias"], eps)
        f = np_gelu_erf(lin(h, "intermediate.dense"))
        h = np_ln(h + lin(f, "output.dense"), W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    pooled = np.tanh(h[0] @ W["pooler.dense.weight"].T + W["pooler.dense.bias"])
    return h, pooled


def numpy_check(name, out_dir, tensors):
    W = {k: v.astype(np.float64) for k, v in load_np(os.path.join(out_dir, "model.safetensors")).items()}
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    worst = 0.0
    if name == "bert-tiny":
        ids, mask = tensors["batch.input_ids"].numpy(), tensors["batch.attention_mask"].numpy()
        for b in range(ids.shape[0]):
            h, pooled = np_bert(W, cfg, ids[b], mask[b])
            n = int(mask[b].sum())
            worst = max(worst, np.abs(h[:n] - tensors["batch.last_hidden_state"][b, :n].double().numpy()).max(),
                        np.abs(pooled - tensors["batch.pooler_output"][b].double().numpy()).max())
            hs, _ = np_bert(W, cfg, tensors[f"s{b}.input_ids"].numpy(), np.ones(n, dtype=np.int64))
            worst = max(worst, np.abs(hs - tensors[f"s{b}.last_hidden_state"].double().numpy()).max())
            mean = h[:n].mean(0)
            worst = max(worst, np.abs(mean / np.linalg.norm(mean)
                                      - tensors["batch.sentence_embedding"][b].double().numpy()).max())
    else:
        fwd = {"bloom-tiny": np_bloom, "gpt2-tiny": np_gpt2, "qwen2-tiny": np_qwen2}[name]
        for i in range(len(PROMPTS)):
            ids = tensors[f"p{i}.input_ids"].tolist() + tensors[f"p{i}.generated_ids"].tolist()
            logits = fwd(W, cfg, np.array(ids))
            n = len(tensors[f"p{i}.input_ids"])
            worst = max(worst,
                        np.abs(logits[:n] - tensors[f"p{i}.prefill_logits"].double().numpy()).max(),
                        np.abs(logits[n:] - tensors[f"p{i}.decode_logits"].double().numpy()).max())
    print(f"  numpy float64 reference: max|numpy - golden| = {worst:.2e}")
    assert worst <= NUMPY_TOL, worst
    return float(worst)


# ---------------------------------------------------------------------------------------
def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


BUILDERS = {"bloom-tiny": bloom_model, "gpt2-tiny": gpt2_model, "qwen2-tiny": qwen2_model, "bert-tiny": bert_model}


def build(name, vocab, seed, linear_std, embed_std):
    cls, cfg = BUILDERS[name](vocab)
    torch.manual_seed(0)
    m = cls(cfg).to(torch.float32)
    init_weights_(m, seed=seed, linear_std=linear_std, embed_std=embed_std)
    return cls, m


def search_seeds(tok):
    for name in ("bloom-tiny", "gpt2-tiny", "qwen2-tiny"):
        spec = MODELS[name]
        for seed in range(1, 13):
            cls, m = build(name, tok.get_vocab_size(), seed, spec["linear_std"], spec["embed_std"])
            with tempfile.TemporaryDirectory() as tmp:
                m.save_pretrained(tmp, safe_serialization=True)
                r = load_f32(cls, tmp)
            _, info, mm, diverse, _ = decoder_golden(r, tok)
            gens = [p["generated_ids"] for p in info["prompts"]]
            print(f"{name} seed={seed:2d} min margin={mm:.4f} diverse={diverse} gen={gens}")


def main():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print("versions:", versions())
    tok = Tokenizer.from_file(LLAMA_TOKENIZER)
    assert tok.get_vocab_size() == 320 and tok.token_to_id("<|bos|>") == 0 and tok.token_to_id("<|eos|>") == 1
    if SEARCH:
        search_seeds(tok)
        return
    btok = build_bert_tokenizer()
    print(f"bert tokenizer: vocab={btok.get_vocab_size()}")

    for name in ("bloom-tiny", "gpt2-tiny", "qwen2-tiny", "bert-tiny"):
        spec = MODELS[name]
        d = os.path.join(FIXTURES, name)
        fresh_dir(d)
        is_bert = name == "bert-tiny"
        if is_bert:
            btok.save(os.path.join(d, "tokenizer.json"))
            vocab = btok.get_vocab_size()
        else:
            shutil.copyfile(LLAMA_TOKENIZER, os.path.join(d, "tokenizer.json"))
            vocab = tok.get_vocab_size()
        cls, m = build(name, vocab, spec["seed"], spec["linear_std"], spec["embed_std"])
        m.save_pretrained(d, safe_serialization=True)
        shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        assert shards == ["model.safetensors"], shards
        r = load_f32(cls, d)
        sd_m, sd_r = m.state_dict(), r.state_dict()
        assert sorted(sd_m) == sorted(sd_r)
        for k in sd_m:
            assert torch.equal(sd_m[k], sd_r[k]), k
        saved = load_np(os.path.join(d, "model.safetensors"))
        print(f"{name}: {len(saved)} tensors saved, lm_head.weight saved: {'lm_head.weight' in saved}")
        meta = {"model": name, "class": cls.__name__, "weights_dtype": "float32", "compute_dtype": "float32",
                "attn_implementation": "eager", "init_seed": spec["seed"], "init": {
                    "norm_weights": "uniform [0.9, 1.1]", "biases_and_norm_biases": f"normal(0, {BIAS_STD})",
                    "embeddings_and_lm_head": f"normal(0, {spec['embed_std']})",
                    "projections": f"normal(0, {spec['linear_std']})"},
                "saved_tensors": {k: list(v.shape) for k, v in sorted(saved.items())}}
        if is_bert:
            tensors, info, log = bert_golden(r, btok)
            info["tokenizer"] = {"vocab_size": vocab, "specials": {s: btok.token_to_id(s) for s in BERT_SPECIALS}}
        else:
            tensors, info, mm, diverse, log = decoder_golden(r, tok)
            assert mm >= MIN_MARGIN, (name, mm)
            assert diverse, name
            if name == "bloom-tiny":
                info["alibi_slopes"] = alibi_slopes(r.config.n_head)
        print("\n".join(log))
        info["numpy_float64_max_abs_diff"] = numpy_check(name, d, tensors)
        info["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                           for k, v in sorted(tensors.items())}
        info.update(meta)
        info["versions"] = versions()
        save_file(tensors, os.path.join(d, "golden.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "golden.json"), "w") as f:
            json.dump(info, f, indent=2, ensure_ascii=False)
            f.write("\n")
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{os.path.relpath(d, REPO)}: {size} bytes")
        for f in sorted(os.listdir(d)):
            print(f"  {os.path.getsize(os.path.join(d, f)):>8}  {f}")
        assert size < 1_000_000, size


if __name__ == "__main__":
    main()
