"""Export a quantized Hugging Face causal LM in the compressed-tensors format (the format of llm-compressor's
checkpoints, which transformers, vLLM and SGLang read; tested here: transformers on CPU).

The output is a Hugging Face model directory: `config.json` with a `quantization_config` in the
compressed-tensors schema, `model.safetensors` with each quantized layer's integer codes as the format
stores them, plus the tokenizer and generation files when given. Symmetric Linear weights (w8a16) are
`pack-quantized` (codes packed densely into int32, the format compressed-tensors picks for integer
weight-only schemes of 1..8 bits); asymmetric ones (secquant's 4- and 3-bit presets) and embedding tables
are `naive-quantized` (one code per int8, with int8 zero points), because transformers 5 with
compressed-tensors 0.20 cannot load packed zero points or packed embeddings (`pack_asymmetric=True`
packs them anyway: the layout vLLM's packed kernels read, not tested here). `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the
default output with the `compressed-tensors` package installed.

The format, the schemes and the packing are compressed-tensors' own (`QuantizationArgs`,
`QuantizationScheme`, `QuantizationConfig`, its registered compressors and `ModelCompressor.update_config`),
fed with secquant's codes: a layer's stored unsigned codes c and zero points z (in [0, 2**b)) become
compressed-tensors' signed codes c - 2**(b-1) and zero points z - 2**(b-1), so (c - z) * scale is
unchanged. Nothing is re-quantized: after compressing, each layer is decompressed again and must give
exactly the weights secquant's model computes with, or the export fails.

What the format cannot express is refused, naming the layer and what to do instead:
activation quantization (secquant's static or dynamic input quantizers), activation-aware smoothing
scales and Hadamard rotations (the presets w4a16, w4a16-gptq, w3a16-gptq, w8a8 use them; the layer's
weight is W s R, which no per-group scale can hold), non-uniform codebooks (nf4, kmeans, pow2),
per-input-channel scales, convolutions, and layers the float architecture does not hold as
`nn.Linear` / `nn.Embedding` (GPT-2's `Conv1D`: compressed-tensors stores `[out, in]` Linear weights).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..artifact.fsutil import atomic_dir
from ..errors import SecquantError

# Tokenizer and generation files copied when present (read as data, never imported or run).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def _require():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise SecquantError("the compressed-tensors export needs the compressed-tensors package: "
                            "pip install compressed-tensors") from None


def _config_of(module: nn.Module, hf_config):
    """The transformers config to write: `hf_config` (a PretrainedConfig, a config.json path or a directory
    holding one) or the module's own `.config`."""
    from transformers import AutoConfig, PretrainedConfig

    if hf_config is None:
        hf_config = getattr(module, "config", None)
    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        if not p.exists():
            raise SecquantError(f"{p}: no such Hugging Face config (give config.json or its directory)")
        hf_config = AutoConfig.from_pretrained(p.parent if p.is_file() else p, trust_remote_code=False)
    if not isinstance(hf_config, PretrainedConfig):
        raise SecquantError("the compressed-tensors export needs the model's Hugging Face config "
                            "(a transformers model, or pass hf_config=config.json)")
    return hf_config


def _float_types(cfg, names: list[str]) -> dict[str, type]:
    """The class each quantized layer has in the float architecture `cfg` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise SecquantError(f"transformers cannot build a causal LM from this config ({e}); the compressed-tensors "
                            "export writes Hugging Face causal LM directories") from None
    out = {}
    for n in names:
        try:
            out[n] = type(ref.get_submodule(n))
        except AttributeError:
            raise SecquantError(f"layer {n!r} is not in the model the config describes: pass the config the model "
                                "was built from") from None
    return out


def _refusal(name: str, mod, float_type: type) -> str | None:
    """Why the layer cannot be written in compressed-tensors (None: it can)."""
    from ..quant.modules import QuantEmbedding, QuantLinear

    if not isinstance(mod, (QuantLinear, QuantEmbedding)):
        return (f"a quantized {type(mod).__name__}: compressed-tensors holds Linear and Embedding weights; "
                "leave it in float (recipe `ignore`)")
    if not issubclass(float_type, (nn.Linear, nn.Embedding)):
        return (f"its float layer is a {float_type.__name__}, not nn.Linear (compressed-tensors stores [out, in] "
                "Linear weights; GPT-2's Conv1D is [in, out]); leave it in float (recipe `ignore`) or export ONNX")
    a = mod.weight_args
    if a is None:
        return "its weights are float and only its activations are quantized: use a weight-only recipe"
    if getattr(mod, "input_quant", None) is not None:
        return ("it quantizes its input activations, which this export does not write: use a weight-only "
                "preset (w8a16, w4a16-rtn, w3a16) or export ONNX")
    if getattr(mod, "smooth_scale", None) is not None:
        return ("it carries activation-aware smoothing scales (the layer stores W*s and divides its input by s), "
                "which compressed-tensors cannot express: use a recipe without `smoothing` (w8a16, w4a16-rtn, "
                "w3a16, w3a16-hqq) or export ONNX")
    if getattr(mod, "rotation_block", None) is not None:
        return ("it stores Hadamard-rotated weights (recipe `rotation`, the GPTQ presets), which compressed-tensors "
                "cannot express: use a recipe without `rotation` or export ONNX")
    if a.format != "int":
        return (f"its weights use the non-uniform {a.format!r} codebook; compressed-tensors holds uniform integer "
                "grids: use format int, or export ONNX")
    if a.granularity == "channel" and a.axis not in (0, -2):
        return "its scales run along the input channels; compressed-tensors scales output channels or groups"
    if a.granularity == "group" and mod.cols % a.group_size:
        return (f"its {mod.cols} input columns are not a whole number of groups of {a.group_size}: "
                "choose a group size that divides them")
    return None


def _ct_args(mod):
    """compressed-tensors QuantizationArgs for a layer, and its scale and zero point in the format's terms."""
    from compressed_tensors.quantization import QuantizationArgs

    a = mod.weight_args
    half = 1 << (a.bits - 1)
    zp = mod.weight_zero_point.to(torch.int16) - half
    rows = mod.rows
    if a.granularity == "group":
        strategy, group, shape = "group", a.group_size, (rows, mod.cols // a.group_size)
    elif a.granularity == "channel":
        strategy, group, shape = "channel", None, (rows, 1)
    else:
        strategy, group, shape = "tensor", None, (1,)
    symmetric = bool((zp == 0).all())
    args = QuantizationArgs(num_bits=a.bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group)
    scale = mod.weight_scale.detach().float().reshape(shape).clone()
    return args, scale, zp.to(torch.int8).reshape(shape)


def _compress_layer(name: str, mod, args, pack_asymmetric: bool):
    """The layer's compressed tensors (local names) and the compressed-tensors scheme (format set)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationScheme

    args, scale, zp = args
    scheme = QuantizationScheme(targets=[name], weights=args)
    kind = nn.Embedding if mod.layer_type == "Embedding" else nn.Linear
    fmt = CompressionFormat(infer_module_format(kind, scheme))
    if fmt == CompressionFormat.pack_quantized and (kind is nn.Embedding or not args.symmetric and not pack_asymmetric):
        # What transformers (5.x) with compressed-tensors (0.20) can load: it builds packed layers on the meta
        # device with unpacked zero points (and refuses the checkpoint's packed ones), and initializes every
        # Embedding's `weight`, which a packed one lacks. Those layers keep one code per int8 (naive-quantized).
        fmt = CompressionFormat.naive_quantized
    scheme.format = fmt
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    # secquant's float weight: (c - z) * s, exactly what its forward multiplies by
    weight = mod.dequantized_weight().detach().float().reshape(mod.rows, mod.cols)
    sd = {"weight": weight, "weight_scale": scale}
    if not args.symmetric:
        sd["weight_zero_point"] = zp
    packed = compressor.compress(dict(sd), scheme)
    back = compressor.decompress(dict(packed), scheme)["weight"].float()
    if not torch.equal(back, weight):
        raise SecquantError(f"layer {name!r}: compressed-tensors does not give back the layer's weights "
                            f"(max difference {float((back - weight).abs().max()):.3g}); nothing was written")
    return packed, scheme


def _group_schemes(schemes: dict[str, object]) -> dict[str, object]:
    """One config group per distinct (weights, format), targets = the exact layer names."""
    from compressed_tensors.quantization import QuantizationScheme

    groups: dict[str, tuple[object, list[str]]] = {}
    for name, s in schemes.items():
        key = json.dumps([s.weights.model_dump(mode="json"), str(s.format)], sort_keys=True)
        groups.setdefault(key, (s, []))[1].append(name)
    return {f"group_{i}": QuantizationScheme(targets=names, weights=s.weights, format=s.format)
            for i, (s, names) in enumerate(groups.values())}


def compressed_state(module: nn.Module, cfg, pack_asymmetric: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    """The checkpoint tensors and compressed-tensors QuantizationConfig of a secquant-quantized transformers model."""
    from compressed_tensors.compressors.format import _flatten_formats
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from ..quant.modules import QuantizedWeightMixin

    quant = {n: m for n, m in module.named_modules() if n and isinstance(m, QuantizedWeightMixin)}
    if not quant:
        raise SecquantError("the model has no quantized layer: quantize it first")
    types = _float_types(cfg, list(quant))
    problems = [f"{n}: {why}" for n, m in quant.items() if (why := _refusal(n, m, types[n])) is not None]
    if problems:
        raise SecquantError(f"{len(problems)} layer(s) cannot be written in compressed-tensors: "
                            + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
    tensors: dict[str, torch.Tensor] = {}
    prefixes = tuple(n + "." for n in quant)
    for key, t in module.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = t.detach().contiguous().clone()
    schemes = {}
    for name, mod in quant.items():
        packed, schemes[name] = _compress_layer(name, mod, _ct_args(mod), pack_asymmetric)
        for k, t in packed.items():
            tensors[f"{name}.{k}"] = t.contiguous()
        if getattr(mod, "bias", None) is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().float().contiguous().clone()
    ignore = sorted(n for n, m in module.named_modules() if type(m) is nn.Linear)  # Linear layers left in float
    qcfg = QuantizationConfig(config_groups=_group_schemes(schemes), ignore=ignore,
                              format=_flatten_formats({s.format for s in schemes.values()}),
                              quantization_status=QuantizationStatus.COMPRESSED)
    return tensors, qcfg


def _tied_pair_quantized(module: nn.Module) -> bool:
    from ..quant.modules import QuantizedWeightMixin

    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return any(isinstance(m, QuantizedWeightMixin) for m in (emb, head) if m is not None)


def export_compressed_tensors(module: nn.Module, hf_config, out_dir: str | os.PathLike,
                              tokenizer_dir: str | os.PathLike | None = None, *, overwrite: bool = False,
                              pack_asymmetric: bool = False) -> Path:
    """Write a secquant-quantized transformers causal LM (`module`, e.g. an artifact's `handle.module`) as a
    compressed-tensors Hugging Face directory `out_dir` (written whole or not at all) and return it.

    `hf_config` is the model's transformers config (a PretrainedConfig, a config.json or its directory; None:
    `module.config`); `tokenizer_dir` a directory whose tokenizer and generation files (see TOKENIZER_FILES) are
    copied. Asymmetric weights are written `naive-quantized` (one code per int8), which transformers loads;
    `pack_asymmetric=True` packs them into int32 (`pack-quantized` with packed zero points, the layout vLLM's
    packed kernels read -- not tested here -- which transformers 5 with compressed-tensors 0.20 refuses to load). Raises SecquantError for layers
    the format cannot express (see the module docstring)."""
    _require()
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    out = Path(out_dir)
    cfg = _config_of(module, hf_config)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok is not None and not tok.is_dir():
        raise SecquantError(f"{tok}: the tokenizer directory does not exist")
    tensors, qcfg = compressed_state(module, cfg, pack_asymmetric)
    config = cfg.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    if config.get("tie_word_embeddings") and _tied_pair_quantized(module):
        config["tie_word_embeddings"] = False  # the quantized table and head are stored apart
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        ModelCompressor(quantization_config=qcfg).update_config(str(tmp))
        if tok is not None:
            for f in TOKENIZER_FILES:
                if (tok / f).is_file():
                    shutil.copyfile(tok / f, tmp / f)
    return out


__all__ = ["export_compressed_tensors", "compressed_state", "TOKENIZER_FILES"]
