"""The Python face of secquant: quantize, load, evaluate.

    import secquant
    qm = secquant.quantize("builtin:digits", "w8a8", out="digits-w8a8")
    qm = secquant.load("digits-w8a8", allow_unsealed=True)  # a plain directory: an explicit choice
    print(secquant.evaluate(qm))
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import (
    CalibrationEntry, LoadedArtifact, Manifest, SourceEntry, load_artifact, save_artifact, state_dict_sha256,
)
from .artifact.store import build_manifest, describe
from .errors import ArtifactError, CalibrationError, ModelError, SecquantError
from .fidelity import compare, float_size_bytes
from .models import ModelHandle, TensorClassifierAdapter, load_model
from .quant.algorithms import quantize_model
from .recipes import Recipe, get_preset, load_recipe

Progress = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class QuantizedModel:
    """A quantized nn.Module with its manifest; call it like the float model."""

    module: nn.Module
    manifest: Manifest
    handle: ModelHandle
    path: Path | None = None
    integrity: Any = None  # security.integrity.IntegrityGuard when the artifact carries a record

    def check_integrity(self, repair: bool = False) -> list:
        """Corrupted groups of the model's tensors found by the integrity record's keyed checksums ([] when
        intact): every tensor the forward pass reads is covered (codes, scales, biases, caches, ...).

        `repair=True` zeroes corrupted groups of packed codes and recomputes corrupted caches; if other
        tensors are corrupted it raises `IntegrityError` naming them (they cannot be rebuilt in memory:
        reload the model). Raises if the artifact carries no integrity record (seal it)."""
        if self.integrity is None:
            raise SecquantError("this model has no integrity record: records are made by `secquant seal`")
        found = self.integrity.check()
        if found and repair:
            from .security.integrity import IntegrityError

            left = self.integrity.repair(found)
            if left:
                done = len(found) - len(left)
                names = sorted({c.name for c in left})
                raise IntegrityError(
                    f"{len(left)} corrupted group(s) in {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                    f"cannot be repaired in place (only packed codes and caches can; {done} group(s) of those were "
                    "repaired): reload the model from the sealed file", left)
        return found

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings (encoders only)."""
        if self.handle.kind != "encoder":
            raise ModelError("encode() is for sentence encoders; call the model on tensors instead")
        with torch.no_grad():
            return self.handle.run(self.module, self.handle.adapter.encode(list(texts)))

    def layers(self) -> list[dict[str, Any]]:
        return describe(self.manifest)


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    p = Path(str(recipe))
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.is_file():
        return load_recipe(p)
    return get_preset(str(recipe))


def _handle(model: str | nn.Module | ModelHandle, weights: str | None) -> ModelHandle:
    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, nn.Module):
        shape = getattr(model, "sample_shape", None)
        return ModelHandle(model.eval(), "classifier", f"python:{type(model).__qualname__}",
                           {"loader": "module", "sample_shape": list(shape) if shape else None},
                           TensorClassifierAdapter(tuple(shape) if shape else None))
    return load_model(str(model), weights)


def _check_out(out: str | Path | None, overwrite: bool) -> None:
    """Fail before any work when the output exists (the write itself is atomic anyway)."""
    if out is not None and Path(out).exists() and not overwrite:
        from .errors import OutputExistsError
        raise OutputExistsError(f"{out} already exists: choose another --out or remove it first")


def source_entry(float_module: nn.Module) -> SourceEntry:
    """What the manifest records about the float source: weights hash, parameter count, fp32 size."""
    return SourceEntry(weights_sha256=state_dict_sha256(float_module.state_dict()),
                       num_parameters=sum(p.numel() for p in float_module.parameters()),
                       float_size_bytes=float_size_bytes(float_module))


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def quantize(
    model: str | nn.Module | ModelHandle,
    recipe: str | Path | Recipe,
    *,
    out: str | Path | None = None,
    calib: str | Path | None = None,
    weights: str | None = None,
    overwrite: bool = False,
    progress: Progress = _no_progress,
    tuning: dict | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    identity: str | Path | None = None,
    passphrase: str | None = None,
) -> QuantizedModel:
    """Quantize a model by preset name, recipe file or Recipe; save the artifact if `out` is given.

    `calib`: a data file (an `.age` file is decrypted in memory with `identity`), or "synthetic"
    for data-free calibration (random vocabulary sentences / ZeroQ inputs). `dp_epsilon` (with
    `dp_delta`) calibrates static activation ranges with differential privacy on `calib`: every
    other data-reading step runs on synthetic inputs only, and the budget spent is recorded in
    the manifest's privacy ledger.
    """
    from .privacy.encrypted_data import plaintext_path

    recipe = resolve_recipe(recipe)
    handle = _handle(model, weights)
    _check_out(out, overwrite)
    with plaintext_path(calib, identity, passphrase) as data:
        qmodule, layers, calibration, privacy = _quantize(handle, recipe, calib, data, progress, dp_epsilon, dp_delta)
    return _finish(qmodule, handle, recipe, layers, source_entry(handle.module), calibration, out, overwrite,
                   tuning=tuning, privacy=privacy)


def _finish(qmodule: nn.Module, handle: ModelHandle, recipe: Recipe, layers: dict, source: SourceEntry,
            calibration: CalibrationEntry, out, overwrite: bool, **manifest_fields) -> QuantizedModel:
    """The QuantizedModel, saved as an artifact directory when `out` is given (else manifest only)."""
    if out is None:
        manifest = build_manifest(handle, recipe, layers, source, calibration, files={}, **manifest_fields)
        return QuantizedModel(qmodule, manifest, handle)
    manifest = save_artifact(Path(out), qmodule, handle, recipe, layers, source, calibration, overwrite,
                             **manifest_fields)
    return QuantizedModel(qmodule, manifest, handle, Path(out))


def _quantize(handle: ModelHandle, recipe: Recipe, calib, data, progress: Progress, dp_epsilon, dp_delta):
    """(quantized module, layers, calibration entry, privacy ledger entries) for one recipe run."""
    from .privacy.synthetic import SYNTHETIC, describe, synthetic_source

    qmodule = copy.deepcopy(handle.module).eval()
    cal = recipe.calibration
    synthetic = calib == SYNTHETIC
    if synthetic and dp_epsilon is not None:
        raise SecquantError("--calib synthetic reads no private data, so there is nothing to spend a DP budget "
                            "on: drop --dp-epsilon, or pass the private calibration file")
    if dp_epsilon is not None and calib is None:
        raise SecquantError("DP calibration needs the private calibration data: pass --calib FILE")
    if dp_epsilon is not None:
        from .privacy.dp_calibration import check_budget

        check_budget(dp_epsilon, dp_delta)
    builtin_free = isinstance(handle.adapter, TensorClassifierAdapter) and handle.adapter.builtin is None
    public = synthetic_source(handle, cal.num_samples, cal.seed) \
        if (synthetic or dp_epsilon is not None) and recipe.needs_calibration else None
    if synthetic or dp_epsilon is not None:
        batches = (lambda: public(cal.batch_size)) if public else None  # noqa: E731
    elif calib is not None or not builtin_free:
        batches = lambda: handle.adapter.calibration_batches(data, cal.num_samples, cal.batch_size)  # noqa: E731
    else:
        batches = None
    try:
        layers, n_samples = quantize_model(qmodule, recipe, batches, handle.run, progress)
        privacy: list[dict] = []
        if dp_epsilon is not None and any(e["activation"] is not None and not e["activation"]["dynamic"]
                                          for e in layers.values()):
            from .privacy.dp_calibration import dp_calibrate

            # one sample per batch for encoders: a padded batch would let one sentence's length change
            # another's statistics (the padding), breaking the per-sample bound DP relies on
            bs = 1 if handle.kind == "encoder" else cal.batch_size
            res = dp_calibrate(qmodule, handle.adapter.calibration_batches(data, cal.num_samples, bs), public(bs),
                               handle.run, dp_epsilon, dp_delta, progress("DP calibration", None))
            res.ledger["public_prior"] = describe(handle)
            privacy.append(res.ledger)
    except SecquantError:
        raise
    except (RuntimeError, ValueError) as e:
        raise CalibrationError(f"quantization failed: the calibration data does not fit the model "
                               f"({str(e).splitlines()[0]})") from None
    if privacy:
        calibration = CalibrationEntry(data="private", source=str(calib), num_samples=privacy[0]["num_samples"])
    elif n_samples and (synthetic or dp_epsilon is not None):
        calibration = CalibrationEntry(data="synthetic", source=describe(handle), num_samples=n_samples)
    elif n_samples:
        calibration = CalibrationEntry(data="raw", source=str(calib) if calib else f"{handle.spec} (built-in)",
                                       num_samples=n_samples)
    else:
        calibration = CalibrationEntry(data="none")
    return qmodule, layers, calibration, privacy


def load(path: str | Path, *, model: nn.Module | None = None, factory: str | None = None,
         identity: str | Path | None = None, verify_key: str | Path | None = None,
         passphrase: str | None = None, allow_unsealed: bool = False) -> QuantizedModel:
    """Rebuild a quantized model from a sealed file or, with `allow_unsealed=True`, a plain
    artifact directory (no pickle; hashes verified first).

    A sealed file needs `identity` (age key) and `verify_key` (signer's public key); it is
    decrypted and verified in a private directory on a memory-backed file system (/dev/shm),
    loaded, and the plaintext removed: it never reaches a disk. A plain directory carries no
    signature, so loading one is an explicit choice of the caller.
    """
    p = Path(path)
    if p.is_file():
        return _load_sealed(p, identity, verify_key, passphrase, model, factory)
    if not allow_unsealed:
        raise SecquantError(f"{p} is a plain, unsealed artifact directory (no signature to verify): pass "
                            "allow_unsealed=True to load it anyway, or seal it (`secquant seal`) and load the "
                            "sealed file with identity= and verify_key=")
    la: LoadedArtifact = load_artifact(p, model=model, factory=factory)
    return QuantizedModel(la.module, la.manifest, la.handle, la.path, _integrity_guard(la))


def _integrity_guard(la: LoadedArtifact):
    """The guard for an artifact with an integrity record: every stored tensor is checked against the
    record now (a mismatch refuses the load), then the caches are computed and covered too."""
    from .security.integrity import INTEGRITY_NAME, IntegrityGuard

    if INTEGRITY_NAME not in la.manifest.files:
        return None
    return IntegrityGuard.from_record(la.module, (Path(la.path) / INTEGRITY_NAME).read_bytes())


def _load_sealed(p: Path, identity, verify_key, passphrase, model, factory) -> QuantizedModel:
    import shutil
    import tempfile

    from .security import open_sealed

    if identity is None or verify_key is None:
        raise SecquantError(f"{p} is a file, so it is opened as a sealed model: give the age identity and the "
                            "signer's public key (--identity KEY --verify-key PUB, or identity= and verify_key=)")
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        raise SecquantError("no memory-backed /dev/shm to open the sealed model in: use `secquant open` to "
                            "write a verified artifact directory, then load that")
    work = Path(tempfile.mkdtemp(prefix="secquant-", dir=shm))  # mode 0700
    try:
        art = open_sealed(p, identity, verify_key, work / "artifact", identity_passphrase=passphrase)
        la = load_artifact(art, model=model, factory=factory)
        return QuantizedModel(la.module, la.manifest, la.handle, None, _integrity_guard(la))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reference_model(qm: QuantizedModel, against: str | nn.Module | None = None, weights: str | None = None) -> nn.Module:
    """The float model to compare against: given, or re-created from the manifest's source spec."""
    if isinstance(against, nn.Module):
        return against.eval()
    spec = against or qm.manifest.model.spec
    if spec.startswith("python:"):
        raise ModelError("this artifact came from a Python module: pass the float model with --against / against=")
    ref = load_model(spec, weights)
    got = state_dict_sha256(ref.module.state_dict())
    if against is None and got != qm.manifest.source.weights_sha256:
        raise ModelError(f"{spec} no longer matches the weights this artifact was made from "
                         "(source hash differs): pass --against MODEL explicitly")
    return ref.module


def evaluate(qm: QuantizedModel, against: str | nn.Module | None = None, data: str | Path | None = None,
             weights: str | None = None, batch_size: int = 32, progress: Progress = _no_progress,
             runtime: str = "torch", threads: int = 2) -> dict[str, Any]:
    """Size, fidelity and latency of a quantized model against its float source, as a dict.

    runtime="onnx" runs the quantized model with ONNX Runtime (`threads` intra-op threads) from the
    artifact's model.onnx, exported (and registered in the manifest) first if it is missing.
    """
    if runtime not in ("torch", "onnx"):
        raise SecquantError(f"unknown runtime {runtime!r}: use torch or onnx")
    ref = reference_model(qm, against, weights)
    size = (qm.path / "model.safetensors").stat().st_size if qm.path else None
    fsize = qm.manifest.source.float_size_bytes
    runner = desc = None
    if runtime == "onnx":
        import onnxruntime

        from .runtime import Session

        if qm.path is None:
            raise SecquantError("runtime='onnx' needs an artifact directory: save the model (out=...) first")
        sess = Session(qm.path, threads=threads)
        runner, desc = sess.run, f"onnxruntime {onnxruntime.__version__} ({threads} threads, CPU)"
    tick = progress("evaluating", None)
    res = compare(qm.module, ref, qm.handle, data, batch_size, tick, runner=runner, runtime=desc)
    if runtime == "onnx":
        res["onnx_size_bytes"] = (qm.path / "model.onnx").stat().st_size
    out = {
        "artifact": str(qm.path) if qm.path else None,
        "model": qm.manifest.model.spec,
        "recipe": qm.manifest.recipe.name,
        "size_bytes": size,
        "float_size_bytes": fsize,
        "size_ratio": (size / fsize) if size else None,
    }
    out.update(res)
    return out




def qat(
    model: str | nn.Module | ModelHandle,
    recipe: str | Path | Recipe,
    *,
    epochs: int,
    out: str | Path | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    train: str | Path | None = None,
    calib: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    weights: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress = _no_progress,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    max_grad_norm: float = 1.0,
) -> QuantizedModel:
    """Quantization-aware retraining (LSQ) of a classifier on its training set; saves like quantize().

    With `dp_epsilon`, retraining runs under DP-SGD (Opacus) and spends at most (dp_epsilon, dp_delta)
    on the training set (see secquant.privacy.dp_training for what that does and does not cover)."""
    from .quant.algorithms import convert_qat, init_activation_ranges, prepare_qat, train_qat

    if epochs < 1:
        raise SecquantError("--epochs must be at least 1")
    recipe = resolve_recipe(recipe)
    handle = _handle(model, weights)
    _check_out(out, overwrite)
    if handle.kind != "classifier" or not hasattr(handle.adapter, "train_set"):
        raise ModelError(f"QAT needs a labelled training set and a classification loss; {handle.spec} is an "
                         f"{handle.kind}: use `secquant quantize` (PTQ) for it")
    x, y = handle.adapter.train_set(train)
    float_module = handle.module
    source = source_entry(float_module)
    if dp_epsilon is None and dp_delta is not None:
        raise SecquantError("--dp-delta needs --dp-epsilon")
    if dp_epsilon is not None:
        if checkpoint_dir is not None:
            raise SecquantError("--checkpoints is not supported with --dp-epsilon: drop one of them")
        from .privacy.dp_training import dp_qat, ledger_entry

        cal = recipe.calibration
        init = handle.adapter.calibration_batches(calib, cal.num_samples, cal.batch_size) if calib else None
        qmodule, layers, training = dp_qat(
            float_module, recipe, x, y, handle.run, epochs=epochs, lr=lr, batch_size=batch_size, epsilon=dp_epsilon,
            delta=dp_delta, max_grad_norm=max_grad_norm, seed=seed, init_batches=init,
            sample_shape=getattr(handle.adapter, "sample_shape", None), synthetic_samples=cal.num_samples,
            progress=progress("training (DP-SGD)", epochs))
        calibration = CalibrationEntry(
            data="private", num_samples=int(len(y)),
            source=(str(train) if train else f"{handle.spec} training split (built-in)")
            + f" (DP-SGD, epsilon={training['dp']['epsilon']:.3g}, delta={training['dp']['delta']:.3g})")
        return _finish(qmodule, handle, recipe, layers, source, calibration, out, overwrite, training=training,
                       privacy=[ledger_entry(training["dp"])])
    torch.manual_seed(seed)
    qmodule = copy.deepcopy(float_module)
    for p in qmodule.parameters():
        p.requires_grad_(True)
    prepare_qat(qmodule, recipe)
    cal = recipe.calibration
    calib_batches = handle.adapter.calibration_batches(calib, cal.num_samples, cal.batch_size) if calib else \
        (x[i:i + cal.batch_size] for i in range(0, min(len(x), cal.num_samples), cal.batch_size))
    init_activation_ranges(qmodule, calib_batches, handle.run)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            yield x[b], y[b]

    ckpt = None
    if checkpoint_dir is not None:
        from safetensors.torch import save_file

        cdir = Path(checkpoint_dir)
        cdir.mkdir(parents=True, exist_ok=True)

        def ckpt(epoch: int, m: nn.Module) -> None:
            tmp = cdir / f".epoch-{epoch}.tmp"
            save_file({k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}, str(tmp))
            tmp.replace(cdir / f"epoch-{epoch}.safetensors")

    losses = train_qat(qmodule, batches, torch.nn.functional.cross_entropy, epochs, lr, checkpoint_fn=ckpt,
                       progress=progress("training", epochs))
    layers = convert_qat(qmodule)
    qmodule.eval()
    for p in qmodule.parameters():
        p.requires_grad_(False)
    calibration = CalibrationEntry(data="raw", source=str(train) if train else f"{handle.spec} training split (built-in)",
                                   num_samples=int(len(y)))
    training = {"method": "LSQ (learned step size) quantization-aware retraining, straight-through estimator",
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "train_samples": int(len(y)),
                "losses": [round(v, 6) for v in losses]}
    return _finish(qmodule, handle, recipe, layers, source, calibration, out, overwrite, training=training)
