#!/usr/bin/env python3
"""Make the torch dynamic-quantization reference for the `int8-dynamic` scheme.

What it makes
-------------
``tests/fixtures/torch-dynamic/reference.safetensors`` and ``reference.json``.

The model is the MLP of the "quantization basics" article (DIGEST.md, 002), halved in
width so the fixture stays under 1 MB: Linear 384→256, ReLU, Linear 256→157, ReLU,
Linear 157→64, ReLU, Linear 64→32, Sigmoid (the article's 768-512-314-128-64 divided by
two, odd 157 kept odd).  torch.manual_seed(0), default nn.Linear initialisation; the
input is a batch of 4 rows drawn from torch.randn, times 3 (so the activation range is
wide and the reduced 7-bit activation range matters).

The model is quantized with
``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` on the
default engine (x86, i.e. fbgemm for dynamic Linear).

Tensors saved (all little-endian, float32 unless said otherwise):

``input``                 the [4, 384] batch.
``layers.{i}.weight``     float weight [out, in] of Linear i (0..3).
``layers.{i}.bias``       float bias [out].
``layers.{i}.input``      the float input Linear i sees in the float model.
``layers.{i}.qweight``    torch's int8 weight (int_repr), I8 [out, in].
``layers.{i}.qoutput``    torch's quantized Linear i applied to ``layers.{i}.input``
                          (one layer at a time, on the same float inputs as ours).
``output_float``          the float model's output.
``output_quantized``      the quantized model's output (layers chained).

``reference.json`` holds the versions, the engine, each layer's weight scale and zero
point (from the packed weight), and the activation scale and zero point torch chooses
for each layer's input (``torch._choose_qparams_per_tensor(x, reduce_range=True)``, the
function dynamic quantization uses; fbgemm computes the same in C++).

Run: /tmp/goldenv/bin/python scripts/make_torch_dynamic_reference.py
"""

import json
import pathlib
import platform

import torch
from safetensors.torch import save_file
from torch import nn

WIDTHS = [384, 256, 157, 64, 32]
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "torch-dynamic"


def build_model():
    torch.manual_seed(0)
    layers = []
    for i in range(len(WIDTHS) - 1):
        layers.append(nn.Linear(WIDTHS[i], WIDTHS[i + 1]))
        layers.append(nn.ReLU() if i < len(WIDTHS) - 2 else nn.Sigmoid())
    return nn.Sequential(*layers).eval()


def main():
    model = build_model()
    x = torch.randn(4, WIDTHS[0]) * 3.0
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)

    tensors = {"input": x.contiguous()}
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "engine": torch.backends.quantized.engine,
        "widths": WIDTHS,
        "layers": [],
    }
    with torch.no_grad():
        h = x
        for i in range(len(WIDTHS) - 1):
            fl, ql = model[2 * i], quantized[2 * i]
            qw = ql.weight()
            tensors[f"layers.{i}.weight"] = fl.weight.detach().contiguous()
            tensors[f"layers.{i}.bias"] = fl.bias.detach().contiguous()
            tensors[f"layers.{i}.input"] = h.clone()
            tensors[f"layers.{i}.qweight"] = qw.int_repr().contiguous()
            tensors[f"layers.{i}.qoutput"] = ql(h).contiguous()
            act_scale, act_zp = torch._choose_qparams_per_tensor(h, True)
            meta["layers"].append(
                {
                    "in": WIDTHS[i],
                    "out": WIDTHS[i + 1],
                    "qscheme": str(qw.qscheme()),
                    "weight_scale": qw.q_scale(),
                    "weight_zero_point": qw.q_zero_point(),
                    "activation_scale": act_scale,
                    "activation_zero_point": act_zp,
                    "activation_min": h.min().item(),
                    "activation_max": h.max().item(),
                }
            )
            h = model[2 * i + 1](fl(h))
        tensors["output_float"] = h.contiguous()
        tensors["output_quantized"] = quantized(x).contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    diff = (tensors["output_float"] - tensors["output_quantized"]).abs().max().item()
    print(f"wrote {OUT}; float vs quantized max abs diff {diff:.3e}")


if __name__ == "__main__":
    main()
