#!/usr/bin/env python3
"""Make golden Llama fixtures with Hugging Face transformers.

What it makes
-------------
Two tiny, randomly initialised Llama models (``transformers.LlamaForCausalLM``)
plus a byte-level BPE tokenizer, and the logits transformers computes for them,
so the Rust Llama forward pass can be checked against a reference:

``tests/fixtures/llama-tiny/``
    hidden 64, intermediate 176, 2 layers, 4 attention heads, 2 KV heads
    (grouped-query attention, head_dim 16), rms_norm_eps 1e-6, rope theta 10000,
    untied lm_head, max_position_embeddings 128.  Init: every projection,
    embedding and lm_head normal(0, 0.08), norm weights uniform [0.9, 1.1].  Weights stored as float32,
    SHARDED into ``model-00001-of-00002.safetensors``,
    ``model-00002-of-00002.safetensors`` + ``model.safetensors.index.json``
    (layer 1's attention projections land in shard 1, its norms and MLP in
    shard 2, so one layer's tensors span both files).

``tests/fixtures/llama-tiny-tied/``
    hidden 32, intermediate 88, 2 layers, 4 heads, 4 KV heads (head_dim 8),
    rms_norm_eps 1e-5, rope theta 500000, tie_word_embeddings=True (no
    ``lm_head.weight`` tensor in the file).  Init: embedding normal(0, 0.08),
    projections normal(0, 0.2) (with 0.08 the tied model only repeats the
    input token), norm weights uniform [0.9, 1.1].  Weights stored as bfloat16 in a
    single ``model.safetensors``.  The golden logits are computed in float32 on
    exactly the bf16-rounded weights (the saved folder is reloaded with
    ``dtype=torch.float32``).

Both folders hold ``config.json``, ``generation_config.json``,
``tokenizer.json`` (the same file in both), ``golden.safetensors`` and
``golden.json`` (for humans).

Tokenizer: ``tokenizers`` BPE, ByteLevel pre-tokenizer (add_prefix_space=False,
use_regex=True), ByteLevel decoder, no normalizer, no post-processor.  Ids 0 and
1 are the special tokens ``<|bos|>`` and ``<|eos|>``, ids 2..257 the 256 byte
tokens (ByteLevel alphabet), then the merges learnt from TRAIN_TEXT below, up to
VOCAB_SIZE = 320 in total (62 merges, stored as ``[a, b]`` pairs).  The byte
tokens are in the order of the ByteLevel alphabet's characters, NOT byte value
order (id 2 is "!", i.e. byte 0x21).  tokenizers serialises the ByteLevel
decoder with ``add_prefix_space: true`` (its default; it does not affect
decoding).

Golden tensors (``golden.safetensors``), all computed in float32 with
``attn_implementation="eager"``, ``model.eval()`` and ``torch.no_grad()``, on
the model reloaded from the saved folder:

``p{i}.input_ids``       int64  [len]         PROMPTS[i] encoded, add_special_tokens=False (no BOS)
``p{i}.prefill_logits``  f32    [len, vocab]  one forward pass over the whole prompt
``p{i}.generated_ids``   int64  [6]           greedy tokens
``p{i}.decode_logits``   f32    [6, vocab]    logits of each KV-cached decode step
``batch.input_ids``      int64  [2, L]        prompts 0 and 1 truncated to L = the shorter length
``batch.prefill_logits`` f32    [2, L, vocab] one forward pass over that batch, no padding, no mask

Greedy decode convention (the model is called step by step with the KV cache
from the previous call and ``use_cache=True``, not via ``generate()``; the
forward kwarg is ``cache`` in transformers 5.24, ``past_key_values`` before):

* ``generated_ids[0] = argmax(prefill_logits[-1])``
* ``decode_logits[t]`` is the output of the step that FEEDS ``generated_ids[t]``
  (at position len + t) with the cache of everything before it, so
  ``argmax(decode_logits[t]) == generated_ids[t + 1]`` for t < 5, and
  ``argmax(decode_logits[5])`` is the (unrecorded) 7th token.

``golden.json`` repeats the ids, shows the tokens, the decoded generated text
(lossy: ByteLevel byte tokens that are not whole UTF-8 sequences decode to
U+FFFD) and ``greedy_margins_top1_minus_top2`` with 7 entries: the prefill's
last row, then decode_logits[0..5] (the last one picks the unrecorded token).

The script checks that the decode-step logits agree with one full forward pass
over prompt + generated tokens to 1e-5, that the batch rows match the single
prompt runs, and it prints the top-1/top-2 logit margin of every greedy step (a
tiny margin would make the greedy tokens fragile for another implementation).
An independent float64 numpy Llama forward (RoPE in the non-interleaved
"rotate_half" layout: pairs (i, i + head_dim/2); GQA head h uses KV head
h // (heads / kv_heads)) matched all golden logits to within 2e-6.

How to rerun
------------
Needs only PyPI packages (no model hub access)::

    python3 -m venv /tmp/goldenv
    /tmp/goldenv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
    HF_HUB_OFFLINE=1 /tmp/goldenv/bin/python scripts/make_golden_llama.py

(writes to ``tests/fixtures`` under the parent of this script's folder, or
under the repository root given as the first argument; existing fixture
folders are deleted and rewritten).  Everything is seeded; rerunning with the same versions reproduces
the same bytes.

Versions it was run with
------------------------
Python 3.11.7, torch 2.15.0 (PyPI wheel, ``torch.__version__`` = "2.15.0+cu132",
run on CPU; the CUDA wheels it depends on must be installed for ``import torch``
to work, a ``--no-deps`` install fails), transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, numpy 2.4.6 (pip freeze).

Config form written by this transformers version (5.24.0): the RoPE settings
are in ``"rope_parameters": {"rope_theta": ..., "rope_type": "default"}``; there
is no top-level ``rope_theta`` and no ``rope_scaling``.  ``head_dim`` IS written
explicitly (hidden_size / num_attention_heads).  The weight dtype is written as
``"dtype"`` (older versions: ``"torch_dtype"``).  The tied model's config says
``"dtype": "bfloat16"``.
"""

import inspect
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

VOCAB_SIZE = 320
BOS, EOS = "<|bos|>", "<|eos|>"
N_DECODE = 6
# Weight-init seeds.  Picked (among 1..12) so that every greedy step of every prompt has a
# top-1 / top-2 logit margin of at least ~0.02, so the greedy tokens are not fragile.
SEED_TINY = 12
SEED_TIED = 12
TOL = 1e-5

PROMPTS = [
    "The quick brown fox",
    "Quantization trades accuracy for memory.",
    "a b c 1 2 3",
]

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog does not move; it only
watches the fox run across the field and into the forest at the end of the day.

Quantization is the process of mapping a large set of values to a smaller set.
In machine learning, quantization trades a little accuracy for a lot of memory:
weights stored in eight or four bits take a fraction of the space of thirty two
bit floating point numbers, and the model often runs faster as well.

A benchmark measures how well a method works. To compare quantization methods
fairly, we run the same model on the same prompts, record the logits and the
perplexity, and report the memory used and the time taken for every method.

The transformer model reads tokens, turns them into vectors, and passes them
through attention and feed forward layers. Each layer has its own weights. The
attention uses queries, keys and values; the keys and values of earlier tokens
are kept in a cache so that generation of the next token is cheap.

Numbers such as 1, 2, 3, 10, 42 and 2024 appear in text too, and so do letters
on their own: a, b, c, x, y and z. The tokenizer must handle all of them.
"""


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer, length=1)
    assert len(pre_tokenizers.ByteLevel.alphabet()) == 256
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def init_weights_(model, seed, linear_std=0.08, embed_std=0.08):
    """Larger-than-default random init so the logits are far from uniform.

    Norm weights: uniform in [0.9, 1.1].  Embedding (and untied lm_head):
    normal(0, embed_std).  Attention / MLP projections: normal(0, linear_std).
    Parameters are visited in sorted name order from one seeded generator.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * (2.0 * torch.rand(p.shape, generator=g) - 1.0))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(linear_std * torch.randn(p.shape, generator=g))


def make_config(tok, **kw):
    rope_theta = kw.pop("rope_theta")
    fields = set(getattr(LlamaConfig, "__dataclass_fields__", {})) | set(
        inspect.signature(LlamaConfig.__init__).parameters)
    if "rope_parameters" in fields:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    else:  # older transformers
        kw["rope_theta"] = float(rope_theta)
    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        **kw,
    )


# transformers 5.x renamed the forward kwarg / output field `past_key_values` to `cache`
# (the old name still works in 5.24 but warns); use whichever this version has.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def get_cache(out):
    c = getattr(out, "cache", None) if CACHE_KW == "cache" else None
    return c if c is not None else out.past_key_values


def load_f32(path):
    m = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    assert next(m.parameters()).dtype == torch.float32
    return m


@torch.no_grad()
def golden(model, tok, out_dir, meta):
    tensors = {}
    info = {"prompts": [], "decode_convention": (
        "generated_ids[0] = argmax(prefill_logits[-1]); decode_logits[t] is the output after feeding "
        "generated_ids[t] with the KV cache, so argmax(decode_logits[t]) = generated_ids[t+1]")}
    min_margin = float("inf")
    ids_list = []
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, (tok.decode(ids), text)
        ids_list.append(ids)
        x = torch.tensor([ids], dtype=torch.int64)
        out = model(input_ids=x, use_cache=True)
        prefill = out.logits[0].float().clone()
        past = get_cache(out)
        gen, dec = [], []
        nxt = int(prefill[-1].argmax())
        margins = [float(prefill[-1].topk(2).values[0] - prefill[-1].topk(2).values[1])]
        for t in range(N_DECODE):
            gen.append(nxt)
            o = model(input_ids=torch.tensor([[nxt]], dtype=torch.int64), use_cache=True, **{CACHE_KW: past})
            past = get_cache(o)
            row = o.logits[0, -1].float().clone()
            dec.append(row)
            top2 = row.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(row.argmax())
        dec = torch.stack(dec)
        # Check: KV-cached decode == one full forward over prompt + generated tokens.
        full_ids = torch.tensor([ids + gen], dtype=torch.int64)
        full = model(input_ids=full_ids, use_cache=False).logits[0].float()
        n = len(ids)
        d_pre = (full[:n] - prefill).abs().max().item()
        d_dec = (full[n : n + N_DECODE] - dec).abs().max().item()
        print(f"  p{i}: len={n} gen={gen} max|prefill-full|={d_pre:.2e} max|decode-full|={d_dec:.2e} "
              f"min top1-top2 margin={min(margins):.4f}")
        assert d_pre <= TOL and d_dec <= TOL, (d_pre, d_dec)
        for t in range(N_DECODE - 1):
            assert int(dec[t].argmax()) == gen[t + 1]
        assert int(prefill[-1].argmax()) == gen[0]
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
    # Batch: prompts 0 and 1 truncated to the shorter length, no padding.
    L = min(len(ids_list[0]), len(ids_list[1]))
    bx = torch.tensor([ids_list[0][:L], ids_list[1][:L]], dtype=torch.int64)
    bl = model(input_ids=bx, use_cache=False).logits.float().contiguous()
    for b in range(2):
        d = (bl[b] - tensors[f"p{b}.prefill_logits"][:L]).abs().max().item()
        print(f"  batch row {b}: L={L} max|batch-single|={d:.2e}")
        assert d <= TOL, d
    tensors["batch.input_ids"] = bx
    tensors["batch.prefill_logits"] = bl
    info["batch"] = {"prompts": [0, 1], "L": L, "input_ids": bx.tolist()}
    info["min_greedy_margin"] = round(min_margin, 6)
    info["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                       for k, v in sorted(tensors.items())}
    info.update(meta)
    info["versions"] = versions()
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
        f.write("\n")


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


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print("versions:", versions())
    tok = build_tokenizer()
    print(f"tokenizer: vocab={tok.get_vocab_size()} bos={tok.token_to_id(BOS)} eos={tok.token_to_id(EOS)}")

    # ---- 1. llama-tiny: f32, GQA, untied, 2 shards ----------------------------------------
    d1 = os.path.join(FIXTURES, "llama-tiny")
    fresh_dir(d1)
    tok.save(os.path.join(d1, "tokenizer.json"))
    cfg1 = make_config(
        tok, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    m1 = LlamaForCausalLM(cfg1).to(torch.float32)
    init_weights_(m1, seed=SEED_TINY, linear_std=0.08, embed_std=0.08)
    total = sum(p.numel() * p.element_size() for p in m1.parameters())
    # a shard limit of ~60% of the total gives exactly two shards for this layout
    m1.save_pretrained(d1, max_shard_size=int(total * 0.6), safe_serialization=True)
    shards = sorted(f for f in os.listdir(d1) if f.endswith(".safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], shards
    assert os.path.exists(os.path.join(d1, "model.safetensors.index.json"))
    r1 = load_f32(d1)
    for (n, p), (n2, q) in zip(sorted(m1.state_dict().items()), sorted(r1.state_dict().items())):
        assert n == n2 and torch.equal(p, q), n
    print("llama-tiny:")
    golden(r1, tok, d1, {"model": "llama-tiny", "weights_dtype": "float32", "sharded": True,
                         "compute_dtype": "float32", "attn_implementation": "eager"})

    # ---- 2. llama-tiny-tied: bf16 storage, MHA, tied, single file -------------------------
    d2 = os.path.join(FIXTURES, "llama-tiny-tied")
    fresh_dir(d2)
    shutil.copyfile(os.path.join(d1, "tokenizer.json"), os.path.join(d2, "tokenizer.json"))
    cfg2 = make_config(
        tok, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(2)
    m2 = LlamaForCausalLM(cfg2).to(torch.float32)
    # With tied embeddings and std 0.08 everywhere, the input token's own embedding dominates
    # the residual stream and greedy decoding just repeats one token; larger projections
    # (std 0.2) make the layers matter and the generated tokens vary.
    init_weights_(m2, seed=SEED_TIED, linear_std=0.2, embed_std=0.08)
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    m2 = m2.to(torch.bfloat16)
    m2.save_pretrained(d2, safe_serialization=True)
    shards = sorted(f for f in os.listdir(d2) if f.endswith(".safetensors"))
    assert shards == ["model.safetensors"], shards
    r2 = load_f32(d2)
    for (n, p), (n2, q) in zip(sorted(m2.state_dict().items()), sorted(r2.state_dict().items())):
        assert n == n2 and torch.equal(p.float(), q), n
    assert r2.lm_head.weight.data_ptr() == r2.model.embed_tokens.weight.data_ptr()
    print("llama-tiny-tied:")
    golden(r2, tok, d2, {"model": "llama-tiny-tied", "weights_dtype": "bfloat16", "sharded": False,
                         "compute_dtype": "float32 (bf16 weights upcast exactly)",
                         "attn_implementation": "eager"})

    for d in (d1, d2):
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{os.path.relpath(d, REPO)}: {size} bytes")
        for f in sorted(os.listdir(d)):
            print(f"  {os.path.getsize(os.path.join(d, f)):>8}  {f}")
        assert size < 1_000_000, size


if __name__ == "__main__":
    main()
