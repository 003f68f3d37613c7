#!/usr/bin/env python3
"""Time PyTorch "peer" engines decoding on a CUDA GPU, at the shapes the harness times.

What it measures
----------------
For each (model, engine, batch) it builds the model from its config alone (no checkpoint)
directly on the device, fills every weight with seeded normal values (std 0.02; norm
weights 1, biases 0), and times ``model.generate`` on a prompt of ``--prompt-len`` seeded
random token ids, greedy, with exactly ``--gen-len`` new tokens (no early stop).

* prefill ms      median time of a generate with one new token (the prompt's forward);
* decode ms/step  median over repeats of (t(gen_len) - t(1)) / (gen_len - 1);
* tokens/s        batch * 1000 / decode ms/step;
* peak GB         torch.cuda.max_memory_allocated, reset once the model is built (and
                  quantized), so it covers compile, CUDA graphs, the KV cache and the runs;
* weight bytes    parameters and buffers as stored (for torchao's int4 tensors, the bytes
                  of their inner tensors: packed data and scales/zeros, padding included).

Models: ``bloom-560m`` (BloomForCausalLM, tied embeddings) and ``llama-2-7b``
(LlamaForCausalLM), the shapes of the harness's ``builtin:*-shapes`` models.

Engines:

* ``eager``           bf16, the default dynamic cache;
* ``compile-static``  bf16, ``cache_implementation="static"`` and
                      ``model.forward = torch.compile(model.forward, mode="reduce-overhead",
                      fullgraph=True)`` (retried once without fullgraph if that fails);
* ``torchao-int4``    torchao weight-only int4, group 128, tile_packed_to_4d (tinygemm),
                      then the same compile and static cache. Skipped when torchao cannot
                      be imported.

Each config is warmed up before ``--repeats`` timed runs: the compiled engines run one
eager generate first (so the static cache is made outside the compiled region), then two
compiled rounds (so CUDA graphs are recorded); their records count the graphs compiled,
graph breaks and CUDA-graph skips, and say whether anything was compiled while timed.

Configs run most important first: every engine at batch 1 for llama-2-7b, then for
bloom-560m, then batch 8, then 32. Before each config the script estimates its cost from
what the same model and engine took so far (or a prior) and skips it when it would not
fit in ``--budget-s``; a config still running when the budget ends is interrupted.
Errors are recorded per config and the run goes on.

Outputs, in ``--out``: ``peers.json`` (machine, settings, one record per config) and
``peers.md`` (a table), both rewritten atomically after every config, so a killed run
keeps what it had.

Run on the GPU machine, from the repository root:

    python3 scripts/peers/gpu_decode.py --out reports/gpu-peers

torchao goes in from a wheel, offline, before the run (see README.md beside this file).
Smoke test on a CPU, with tiny shapes:

    python3 scripts/peers/gpu_decode.py --device cpu --tiny \\
        --engines eager,compile-static --batches 1,2 --out /tmp/peers-test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START = time.monotonic()  # the budget counts from here, before the heavy imports

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
import transformers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.utils._python_dispatch import is_traceable_wrapper_subclass  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BloomConfig,
    LlamaConfig,
    PreTrainedModel,
)

MODELS = ("llama-2-7b", "bloom-560m")  # also the run order within a batch size
ENGINES = ("eager", "compile-static", "torchao-int4")
COMPILED = {"compile-static", "torchao-int4"}
# Seconds a config is assumed to take before one of the same model and engine has run.
PRIOR_COST_S = {"eager": 20.0, "compile-static": 90.0, "torchao-int4": 120.0}
COST_MARGIN = 1.25
INT4_GROUP = 128
WEIGHT_STD = 0.02
ERROR_CHARS = 2000
TRACEBACK_LINES = 25


class BudgetExceeded(BaseException):
    """Raised by SIGALRM when the time budget ends during a config (a BaseException, so
    that library code catching Exception cannot swallow it)."""


@dataclass(frozen=True)
class Config:
    model: str
    engine: str
    batch: int


@dataclass
class Run:
    """What the run has learnt so far: costs per (model, engine), and where fullgraph
    compilation failed."""

    costs: dict[tuple[str, str], float] = field(default_factory=dict)
    no_fullgraph: set[tuple[str, str]] = field(default_factory=set)


def model_config(name: str, tiny: bool) -> transformers.PretrainedConfig:
    if name == "bloom-560m":
        if tiny:
            return BloomConfig(vocab_size=512, hidden_size=128, n_layer=2, n_head=4)
        return BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16, tie_word_embeddings=True)
    if tiny:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


@torch.no_grad()
def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """The model on `device` in `dtype`, every weight seeded: no checkpoint, no CPU init."""
    with torch.device(device):
        # `torch_dtype` is the keyword every transformers version accepts (newer ones warn).
        model = AutoModelForCausalLM.from_config(model_config(name, tiny), torch_dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    for param_name, param in model.named_parameters():
        if param.dim() == 1:  # norm weights and biases
            param.fill_(0.0 if param_name.endswith("bias") else 1.0)
        else:
            param.normal_(0.0, WEIGHT_STD, generator=generator)
    generation = model.generation_config
    generation.eos_token_id = None  # never stop early
    generation.pad_token_id = 0
    generation.disable_compile = True  # only the engine's own torch.compile, never generate's
    return model.eval().requires_grad_(False)


def tensor_bytes(tensor: torch.Tensor) -> int | None:
    """Bytes a tensor stores; for a wrapper subclass (torchao), the sum of its inner
    tensors; None for a tensor type it cannot see into."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = [tensor_bytes(getattr(tensor, name)) for name in names]
        return None if None in inner else sum(inner)
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    return None


def weight_bytes(model: torch.nn.Module) -> int | None:
    sizes = [tensor_bytes(t) for t in [*model.parameters(), *model.buffers()]]
    return None if None in sizes else sum(sizes)


def torchao_problem() -> str | None:
    """Why torchao's int4 path cannot be used here, or None."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_  # noqa: F401
    except Exception as error:  # noqa: BLE001 (an ImportError, or a broken extension)
        return f"torchao not importable: {type(error).__name__}: {error}"
    return None


def engine_problem(engine: str, device: torch.device) -> str | None:
    """Why `engine` cannot run on `device`, or None."""
    if engine != "torchao-int4":
        return None
    if device.type != "cuda":
        return "torchao int4 (tinygemm) needs CUDA"
    return torchao_problem()


@torch.no_grad()
def quantize_int4(model: torch.nn.Module) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantize_(model, Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d"))


def compile_forward(model: torch.nn.Module, forward: Callable[..., Any], fullgraph: bool) -> None:
    """The transformers recipe for static-cache compiled decode; CUDA graphs on CUDA only."""
    options: dict[str, Any] = {"fullgraph": fullgraph}
    if model.device.type == "cuda":
        options["mode"] = "reduce-overhead"
    model.forward = torch.compile(forward, **options)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(
    model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, cache: str | None
) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate of exactly `new_tokens` tokens, and its output."""
    options: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
    }
    if cache is not None:
        options["cache_implementation"] = cache
    synchronize(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, **options)
    synchronize(ids.device)
    seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {new_tokens}")
    return seconds, out


def timing_round(
    model: PreTrainedModel, ids: torch.Tensor, gen_len: int, cache: str | None
) -> tuple[float, float, torch.Tensor]:
    """(t(gen_len), t(1), output of the long run). The long run goes first, so a static
    cache is sized for it once and the short run reuses that size (no recompilation)."""
    t_gen, out = timed_generate(model, ids, gen_len, cache)
    t_one, _ = timed_generate(model, ids, 1, cache)
    return t_gen, t_one, out


def warm_up(
    model: PreTrainedModel, ids: torch.Tensor, args: argparse.Namespace, cache: str | None, rounds: int
) -> None:
    for _ in range(rounds):
        timing_round(model, ids, args.gen_len, cache)


def warm_up_compiled(
    model: PreTrainedModel, ids: torch.Tensor, args: argparse.Namespace, config: Config, run: Run, record: dict
) -> None:
    """Compile, then warm up; if fullgraph compilation fails, once more without it.

    One eager generate comes first: transformers versions that keep the static cache from
    one generate to the next then build it outside the compiled region, where it is marked
    as a static address, which CUDA graphs need for the cache they update in place."""
    key = (config.model, config.engine)
    timed_generate(model, ids, args.gen_len, "static")
    forward = model.forward
    fullgraph = key not in run.no_fullgraph
    compile_forward(model, forward, fullgraph)
    try:
        warm_up(model, ids, args, "static", rounds=2)
    except Exception as error:
        if not fullgraph:
            raise
        record["fullgraph_error"] = short_error(error)
        run.no_fullgraph.add(key)
        fullgraph = False
        torch._dynamo.reset()
        compile_forward(model, forward, fullgraph)
        warm_up(model, ids, args, "static", rounds=2)
    record["fullgraph"] = fullgraph


def measure(config: Config, args: argparse.Namespace, run: Run, record: dict) -> None:
    """Build, prepare and time one config, filling `record`."""
    device, dtype = args.device, args.dtype
    started = time.monotonic()
    model = build_model(config.model, args.tiny, device, dtype, args.seed)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if config.engine == "torchao-int4":
        quantize_int4(model)
    record["weight_bytes"] = weight_bytes(model)
    prompt = torch.Generator().manual_seed(args.seed + config.batch)
    ids = torch.randint(0, model.config.vocab_size, (config.batch, args.prompt_len), generator=prompt).to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        record["logits_finite"] = bool(torch.isfinite(logits).all())
        del logits
        record["setup_s"] = round(time.monotonic() - started, 2)
        if device.type == "cuda":
            record["allocated_at_start_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.monotonic()
        if config.engine in COMPILED:
            warm_up_compiled(model, ids, args, config, run, record)
            cache = "static"
        else:
            warm_up(model, ids, args, None, rounds=1)
            cache = None
        record["warmup_s"] = round(time.monotonic() - started, 2)
        graphs = counters["stats"]["unique_graphs"]
        rounds = [timing_round(model, ids, args.gen_len, cache) for _ in range(args.repeats)]
    if config.engine in COMPILED:
        record["compile"] = {
            "graphs": counters["stats"]["unique_graphs"],
            "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - graphs,
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        }
    gens = [t_gen for t_gen, _, _ in rounds]
    ones = [t_one for _, t_one, _ in rounds]
    decode_ms = statistics.median((g - o) * 1000 / (args.gen_len - 1) for g, o in zip(gens, ones, strict=True))
    record["prefill_ms"] = round(statistics.median(ones) * 1000, 3)
    record["decode_ms_per_step"] = round(decode_ms, 4)
    record["tokens_per_s"] = round(config.batch * 1000 / decode_ms, 1) if decode_ms > 0 else None
    record["generate_ms_runs"] = [round(t * 1000, 3) for t in gens]
    record["one_token_ms_runs"] = [round(t * 1000, 3) for t in ones]
    record["first_tokens"] = rounds[-1][2][0, args.prompt_len : args.prompt_len + 8].tolist()
    if device.type == "cuda":
        record["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    record["status"] = "ok"


def short_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:ERROR_CHARS]


def inductor_snapshot() -> bytes | None:
    """The inductor config, to restore after a config (torchao's int4 changes it)."""
    try:
        return torch._inductor.config.save_config()
    except Exception:  # noqa: BLE001 (then it is not restored)
        return None


def clean_up(device: torch.device, inductor: bytes | None) -> str | None:
    """Restore the inductor config, drop compiled code and free memory; what went wrong, if
    anything (after a CUDA error, say), so that the run can go on and record it."""
    try:
        if inductor is not None:
            with warnings.catch_warnings():  # restoring touches deprecated keys, which warn
                warnings.simplefilter("ignore", FutureWarning)
                torch._inductor.config.load_config(inductor)
        torch._dynamo.reset()
        counters.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as error:  # noqa: BLE001
        return short_error(error)
    return None


def on_alarm(signum: int, frame: Any) -> None:
    raise BudgetExceeded()


def run_config(config: Config, args: argparse.Namespace, run: Run, record: dict) -> bool:
    """Run one config within what is left of the budget, filling `record` (errors
    included). True when the budget ran out during it."""
    problem = engine_problem(config.engine, args.device)
    if problem is not None:
        record.update(status="skipped", reason=problem)
        return False
    left = args.budget_s - (time.monotonic() - START)
    key = (config.model, config.engine)
    estimate = run.costs.get(key, PRIOR_COST_S[config.engine]) * COST_MARGIN
    if estimate > left:
        record.update(status="skipped", reason=f"budget: ~{estimate:.0f}s needed, {max(left, 0):.0f}s left")
        return False
    print(f"{config_head(record)} starting ({left:.0f}s of the budget left)", flush=True)
    started = time.monotonic()
    inductor = inductor_snapshot()
    spent = False
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        measure(config, args, run, record)
    except BudgetExceeded:
        signal.setitimer(signal.ITIMER_REAL, 0)
        record.update(status="skipped", reason="budget: ran out during this config")
        spent = True
    except Exception as error:  # noqa: BLE001 (recorded; the run goes on)
        record.update(
            status="error",
            reason=short_error(error),
            traceback=traceback.format_exc().splitlines()[-TRACEBACK_LINES:],
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    problem = clean_up(args.device, inductor)
    if problem is not None:
        record["cleanup_error"] = problem
    record["wall_s"] = round(time.monotonic() - started, 2)
    run.costs[key] = max(run.costs.get(key, 0.0), record["wall_s"])
    return spent


def plan(args: argparse.Namespace) -> list[Config]:
    """Every batch size in turn, smallest first; within one, llama-2-7b then bloom-560m,
    each with every engine."""
    return [
        Config(model, engine, batch)
        for batch in sorted(set(args.batches))
        for model in MODELS
        if model in args.models
        for engine in ENGINES
        if engine in args.engines
    ]


def driver_version() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchao": package_version("torchao"),
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_gb=round(properties.total_memory / 1e9, 1),
            driver=driver_version(),
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "models": args.models,
        "engines": args.engines,
        "batches": args.batches,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "seed": args.seed,
        "tiny": args.tiny,
        "dtype": str(args.dtype).removeprefix("torch."),
        "int4_group_size": INT4_GROUP,
        "weight_std": WEIGHT_STD,
    }


def write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as file:
        file.write(text)
    os.chmod(file.name, 0o644)  # a temporary file is private; a report is not
    os.replace(file.name, path)


def cell(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def notes(record: dict[str, Any]) -> str:
    """The record's status or reason, and what to know about how it was compiled."""
    parts = [record.get("reason") or record["status"]]
    if record.get("fullgraph") is False:
        parts.append("without fullgraph")
    compiled = record.get("compile", {})
    if compiled.get("cudagraph_skips"):
        parts.append(f"{compiled['cudagraph_skips']} CUDA-graph skips")
    if compiled.get("graphs_compiled_while_timed"):
        parts.append("recompiled while timed")
    if record.get("logits_finite") is False:
        parts.append("non-finite logits")
    return ", ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    info, setup = report["machine"], report["settings"]
    where = info.get("gpu") or info.get("cpu")
    lines = [
        "# Peer engines: decode",
        "",
        f"{where}; torch {info['torch']}, transformers {info['transformers']}, torchao {info['torchao'] or '–'}, "
        f"CUDA {info['cuda'] or '–'}, driver {info.get('driver') or '–'}; {info['date']}.",
        f"Prompt {setup['prompt_len']} tokens, {setup['gen_len']} new tokens, greedy, median of "
        f"{setup['repeats']}; {setup['dtype']}, seeded weights{' (tiny shapes)' if setup['tiny'] else ''}.",
        "",
        "| model | engine | batch | prefill ms | decode ms/step | tokens/s | peak GB | weights GB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["records"]:
        weights = None if r.get("weight_bytes") is None else r["weight_bytes"] / 1e9
        note = notes(r).replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['batch']} | {cell(r.get('prefill_ms'), 2)} | "
            f"{cell(r.get('decode_ms_per_step'), 3)} | {cell(r.get('tokens_per_s'), 1)} | "
            f"{cell(r.get('peak_gb'), 2)} | {cell(weights, 2)} | {note} |"
        )
    return "\n".join(lines) + "\n"


def save(out: Path, report: dict[str, Any]) -> None:
    report["elapsed_s"] = round(time.monotonic() - START, 1)
    write_atomically(out / "peers.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "peers.md", markdown(report))


def config_head(record: dict[str, Any]) -> str:
    return f"{record['model']:<11} {record['engine']:<15} b={record['batch']:<3}"


def progress_line(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{config_head(record)} {record['status']}: {record.get('reason', '')}"
    return (
        f"{config_head(record)} prefill {cell(record['prefill_ms'], 2)} ms  "
        f"decode {cell(record['decode_ms_per_step'], 3)} ms/step  {cell(record['tokens_per_s'], 1)} tok/s  "
        f"peak {cell(record.get('peak_gb'), 2)} GB  {notes(record)}  [{record['wall_s']:.0f}s]"
    )


def comma_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}; got {text!r}")
        return items

    return parse


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers; got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for peers.json and peers.md")
    parser.add_argument("--models", type=comma_list(MODELS), default=["bloom-560m", "llama-2-7b"])
    parser.add_argument("--engines", type=comma_list(ENGINES), default=list(ENGINES))
    parser.add_argument("--batches", type=positive_ints, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32, help="new tokens per generate (at least 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.gen_len < 2 or args.prompt_len < 1 or args.repeats < 1:
        parser.error("--gen-len must be at least 2, --prompt-len and --repeats at least 1")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu for a smoke test)")
    # bf16 on the GPU (the engines' precision); float32 on the CPU, where bf16 is slow.
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    signal.signal(signal.SIGALRM, on_alarm)
    configs = plan(args)
    records = [{"model": c.model, "engine": c.engine, "batch": c.batch, "status": "pending"} for c in configs]
    report = {"machine": machine(args.device), "settings": settings(args), "records": records, "finished": False}
    save(args.out, report)
    print(f"{len(configs)} configs, budget {args.budget_s:.0f}s: {json.dumps(report['machine'])}", flush=True)
    run = Run()
    for index, (config, record) in enumerate(zip(configs, records, strict=True)):
        spent = run_config(config, args, run, record)
        if spent:
            for rest in records[index + 1 :]:
                rest.update(status="skipped", reason="budget: spent")
        save(args.out, report)
        print(progress_line(record), flush=True)
        if spent:
            break
    report["finished"] = True
    save(args.out, report)
    print(f"done in {time.monotonic() - START:.0f}s: {args.out / 'peers.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
