"""Building, checking against PyTorch, writing and registering an artifact's model.onnx."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..._version import __version__
from ...errors import SecquantError
from .info import DEFAULT_OPSET, METADATA_KEY, ONNX_NAME, ExportFallbackWarning, ExportInfo, require_onnx
from .trace import TRACE_LOCK, rewrite_layers, simplify, trace_model

# ----------------------------------------------------------------------------------------------
# Building, checking and writing
# ----------------------------------------------------------------------------------------------

# graph_style (models.Adapter.graph_style) -> (module, adapter, sample, **options) -> (ModelProto, ExportInfo) for the
# model kinds whose graph is not the module traced as it is (runtime.onnx.causal registers the causal-LM decoder)
GRAPH_BUILDERS: dict[str, Callable] = {}


def build_onnx(module: nn.Module, adapter, sample, *, opset: int = DEFAULT_OPSET, strict: bool = False,
               accuracy_level: int = 0, quantized: bool = True):
    """The ONNX ModelProto of a secquant model (quantized layers rewritten; float layers as traced)
    and its ExportInfo, in memory. The model's adapter (models.Adapter) names the graph's inputs and
    output for `sample`, a batch as it makes them; `quantized=False` exports every layer as a float layer."""
    require_onnx()
    import onnx
    import onnx.version_converter

    if not DEFAULT_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise SecquantError(f"opset {opset} is not supported: quantized layers need opset >= {DEFAULT_OPSET} "
                            f"(blocked QuantizeLinear, 4-bit tensors); this onnx knows up to "
                            f"{onnx.defs.onnx_opset_version()}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise SecquantError("accuracy_level must be 0..4 (MatMulNBits' accuracy_level)")
    with tempfile.TemporaryDirectory(prefix="secquant-onnx-") as td:
        raw = Path(td) / "traced.onnx"
        with TRACE_LOCK:
            try:
                names, output, layers, ranks = trace_model(module, adapter, sample, opset, raw, quantized)
            except SecquantError:
                raise
            except Exception as e:  # noqa: BLE001 - torch.onnx's tracer fails in many ways on models it cannot follow
                raise SecquantError(f"the model could not be traced to ONNX ({type(e).__name__}: {str(e)[:200]}); "
                                    "evaluate and serve it with the PyTorch runtime (--runtime torch)") from e
        model = onnx.load(str(raw))
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < opset:
        model = onnx.version_converter.convert_version(model, opset)
    simplify(model)
    records = rewrite_layers(model, layers, ranks, strict, accuracy_level) if layers else []
    model.producer_name, model.producer_version = "secquant", __version__
    info = ExportInfo(__version__, opset, adapter.kind, names, output, records)
    _set_info(model, info)
    return model, info


def _set_info(model, info: ExportInfo) -> None:
    for p in [p for p in model.metadata_props if p.key == METADATA_KEY]:
        model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()


def _save(model, path: Path, threshold: int) -> list[Path]:
    """Write the model inline, or with one external data file `<name>.data` when its tensors exceed threshold bytes."""
    import onnx

    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if size > threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0, convert_attribute=False)
        return [path, path.with_name(path.name + ".data")]
    onnx.save_model(model, str(path))
    return [path]


def _run_torch(module: nn.Module, adapter, batch) -> torch.Tensor:
    with torch.no_grad():
        return adapter.run(module, batch).float()


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-sample agreement of two [batch, ...] outputs: max abs difference, relative max error
    (median and max over samples) and cosine similarity (min and mean)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise SecquantError(f"the ONNX model returns shape {tuple(got.shape)} where PyTorch returns {tuple(ref.shape)}")
    g, r = got.reshape(len(got), -1).double(), ref.reshape(len(ref), -1).double()
    rel = (g - r).abs().amax(1) / r.abs().amax(1).clamp(min=1e-12)
    cos = torch.nn.functional.cosine_similarity(g, r, dim=1)
    return {"max_abs_diff": float((g - r).abs().max()), "median_rel_diff": float(rel.median()),
            "max_rel_diff": float(rel.max()), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def agrees(v: dict[str, float]) -> bool:
    """The acceptance rule for an ONNX model against the PyTorch quantized model.

    Quantized models are discontinuous: a last-bit float difference (another GEMM summation order)
    can move an activation across a rounding boundary, and with dynamic per-token ranges such flips
    cascade through the layers (PyTorch's own MiniLM w8a8-dynamic output moves to a mean cosine of
    0.9997, worst 0.9985, when its embeddings are scaled by 1 + 1e-7). So the rule is on cosine:
    loose enough for that, tight enough to catch a wrong scale, zero point or axis.
    """
    return v["mean_cosine"] >= 0.999 and v["min_cosine"] >= 0.98


def validate_onnx(path: str | os.PathLike, reference: torch.Tensor, adapter, batch,
                  threads: int = 1) -> dict[str, float]:
    """Run an ONNX file in ONNX Runtime (all graph optimizations on) and compare with `reference`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = adapter.feeds(batch, [i.name for i in sess.get_inputs()])
    return agreement(torch.from_numpy(sess.run(None, feeds)[0]).float(), reference)


def _validation_batch(handle, sample):
    """A realistic batch for the check after export: the model's built-in evaluation data if any."""
    try:
        return next(iter(handle.adapter.eval_batches(None, 32)))[0]
    except Exception:  # no built-in data: the tracing sample
        return sample


def _loaded(artifact, model=None, factory=None):
    if isinstance(artifact, (str, os.PathLike)):
        from ...models import load_artifact

        return load_artifact(Path(artifact), model=model, factory=factory)
    if all(hasattr(artifact, a) for a in ("module", "manifest", "handle")):
        return artifact
    raise SecquantError(f"export_onnx takes an artifact directory or a loaded artifact, not {type(artifact).__name__}")


def _with_input(adapter, sample_shape, sample_dtype):
    """A copy of a tensor model's adapter with the given input shape and/or dtype."""
    import copy

    from ...models.inputs import check_sample_shape, dtype_name

    if not hasattr(adapter, "sample_shape"):
        raise SecquantError(f"a {adapter.kind} makes its own inputs: sample_shape and sample_dtype (--sample-shape, "
                            "--sample-dtype) are for tensor models")
    adapter = copy.copy(adapter)
    if sample_shape is not None:
        adapter.sample_shape = check_sample_shape(sample_shape)
    if sample_dtype is not None:
        adapter.sample_dtype = dtype_name(sample_dtype)
    return adapter


def _inside(p: Path, d: Path) -> bool:
    try:
        p.resolve().relative_to(d.resolve())
        return True
    except ValueError:
        return False


def _register(art_dir: Path, out: Path) -> None:
    """List the ONNX file (and its external data, or drop a stale one) with their sha256 in the manifest."""
    from ...artifact.manifest import register_files

    rel = out.resolve().relative_to(art_dir.resolve()).as_posix()
    register_files(art_dir, [rel, rel + ".data"])


def _staging_dir(out: Path, art_dir: Path | None) -> Path:
    """A private temporary directory on the same file system as `out`, outside the artifact if possible
    (a crash must not leave unlisted files in it: the artifact would no longer verify)."""
    for parent in ([art_dir.parent] if art_dir is not None and _inside(out, art_dir) else []) + [out.parent]:
        try:
            return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        except OSError:
            continue
    raise SecquantError(f"cannot create a temporary file next to {out}")


def export_onnx(artifact, out_path: str | os.PathLike | None = None, *, external_data_threshold: int = 2**31 - 1,
                opset: int = DEFAULT_OPSET, strict: bool = False, accuracy_level: int = 0, validate: bool = True,
                register: bool = True, sample_input=None, model: nn.Module | None = None,
                factory: str | None = None, sample_shape=None, sample_dtype=None) -> Path:
    """Write the artifact as ONNX (default `<artifact>/model.onnx`) and return the path.

    `artifact` is an artifact directory, a ``LoadedArtifact`` or a ``secquant.load`` /
    ``secquant.quantize`` result. Integer weights stay integers; the operators each scheme maps
    to are listed in this module's docstring and recorded per layer in the file's metadata
    (:func:`export_info`). Layers whose weights ONNX Runtime cannot run (codebook formats) are
    exported with dequantized float weights, reported by an :class:`ExportFallbackWarning` and
    recorded; ``strict=True`` raises :class:`SecquantError` naming the layer instead.

    The file is written under a temporary name and renamed into place. Models whose tensors
    exceed ``external_data_threshold`` bytes use ONNX's external data format (``<name>.data``
    next to the model). ``opset`` >= 21. ``accuracy_level`` goes to MatMulNBits (0: float
    activations, exactly what PyTorch computes; 4: ORT quantizes activations per block
    internally). Unless ``validate=False``, the written model is run by ONNX Runtime on the
    model's evaluation data and compared with the PyTorch quantized model (see :func:`agrees`);
    a mismatch raises and nothing is written. A file written inside the artifact directory is
    added, with its sha256, to the manifest (``register``), so the artifact still verifies and
    Session can check the ONNX file before running it. The graph is traced on a made-up batch of the
    input shape and dtype the manifest records (integer token ids for models whose first layer is an
    nn.Embedding); a classifier that records no shape needs `sample_shape` (one sample, no batch
    dimension; `sample_dtype` float32, int64 or int32 overrides the recorded dtype) or `sample_input`
    (a batch). `model` / `factory` as for ``secquant.load``.
    """
    require_onnx()
    la = _loaded(artifact, model, factory)
    art_dir = Path(la.path) if getattr(la, "path", None) else None
    if out_path is None:
        if art_dir is None:
            raise SecquantError("this model has no artifact directory: pass out_path=")
        out = art_dir / ONNX_NAME
    else:
        out = Path(out_path)
        out = out / ONNX_NAME if out.is_dir() else out
    if out.suffix != ".onnx":
        raise SecquantError(f"{out}: the ONNX file name must end in .onnx")
    adapter = la.handle.adapter
    if sample_shape is not None or sample_dtype is not None:
        adapter = _with_input(adapter, sample_shape, sample_dtype)
    sample = sample_input if sample_input is not None else adapter.sample_batch()
    module = la.module
    build = GRAPH_BUILDERS.get(getattr(adapter, "graph_style", "module"), build_onnx)
    proto, info = build(module, adapter, sample, opset=opset, strict=strict, accuracy_level=accuracy_level)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(out, art_dir)
    try:
        check = None
        if validate:
            batch = _validation_batch(la.handle, sample)
            check = (lambda path: validate_onnx(path, _run_torch(module, adapter, batch), adapter, batch))
        commit_onnx(proto, out, staging, external_data_threshold, check, "the PyTorch quantized model")
        del proto
        if register and art_dir is not None and _inside(out, art_dir):
            _register(art_dir, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fb = info.fallbacks
    if fb:
        warnings.warn(f"{len(fb)} layer(s) exported with dequantized float weights: "
                      + "; ".join(f"{x.name} ({x.fallback})" for x in fb), ExportFallbackWarning, stacklevel=2)
    return out


def commit_onnx(proto, out: Path, staging: Path, external_data_threshold: int,
                check: Callable[[Path], dict] | None, reference: str) -> None:
    """Save `proto` under `staging`, run `check` (validate_onnx on the saved file) if given, then move the file (and
    its external data) to `out`: a model that does not reproduce `reference` raises and nothing is written."""
    written = _save(proto, staging / out.name, external_data_threshold)
    if check is not None:
        v = check(written[0])
        if not agrees(v):
            raise SecquantError(
                f"the exported ONNX model does not reproduce {reference} (mean cosine {v['mean_cosine']:.6f}, "
                f"worst {v['min_cosine']:.6f}, max abs difference {v['max_abs_diff']:.3g}); nothing was written")
    data = out.with_name(out.name + ".data")
    if len(written) == 2:
        os.replace(written[1], data)
    os.replace(written[0], out)
    if len(written) == 1 and data.exists():
        data.unlink()


def export_info(path: str | os.PathLike) -> ExportInfo | None:
    """The ExportInfo stored in an ONNX file written by export_onnx (an artifact directory means its
    model.onnx); None for ONNX files secquant did not write."""
    require_onnx()
    import onnx

    p = Path(path)
    p = p / ONNX_NAME if p.is_dir() else p
    for prop in onnx.load(str(p), load_external_data=False).metadata_props:
        if prop.key == METADATA_KEY:
            return ExportInfo.from_json(prop.value)
    return None


def export_float_onnx(module: nn.Module, adapter, sample, path: str | os.PathLike, *,
                      opset: int = DEFAULT_OPSET) -> Path:
    """A float model (e.g. the source of an artifact) as ONNX with the same tracing, for baselines."""
    proto, _ = build_onnx(module, adapter, sample, opset=opset, quantized=False)
    p = Path(path)
    _save(proto, p, 2**31 - 1)
    return p
