"""The Python face of secquant: quantize, load, evaluate.

    import secquant
    qm = secquant.quantize("builtin:digits", "w8a8", out="digits-w8a8")
    qm = secquant.load("digits-w8a8", allow_unsealed=True)  # a plain directory: an explicit choice
    print(secquant.evaluate(qm))
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import CalibrationEntry, LoadedArtifact, Manifest, SourceEntry, save_artifact, state_dict_sha256
from .artifact.fsutil import atomic_file, private_dir, refuse_existing
from .artifact.store import build_manifest, describe
from .errors import CalibrationError, ModelError, SecquantError, StrictError
from .fidelity import compare, float_size_bytes
from .models import BUILTINS, ModelHandle, load_artifact, load_model
from .models.classifier import module_handle
from .models.factory import is_factory_spec
from .quant.algorithms import quantize_model
from .quant.algorithms.coverage import float_layers, strict_violations
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
    release: Any = None  # security.release.Release of a sealed model (its signed release number), else None
    # key of the manifest's calibration.source_hmac_sha256 (private data files only); given to the caller
    # once and stored nowhere: with it the data owner can prove which file was used (privacy.provenance)
    source_commitment_key: str | None = None

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
        """Outputs for raw texts (text models: sentence embeddings for encoders)."""
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


def _handle(model: str | nn.Module | ModelHandle, weights: str | None, progress: Progress | None = None,
            sample_shape: Any = None, sample_dtype: Any = None, tokenizer: str | Path | None = None) -> ModelHandle:
    if tokenizer is not None and not isinstance(model, (str, Path)):
        raise SecquantError("tokenizer= is for a Hugging Face model directory named by its path")
    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, nn.Module):
        return module_handle(model, f"python:{type(model).__qualname__}", {"loader": "module"}, sample_shape,
                             sample_dtype)
    done = (progress or _no_progress)("loading model", 1)
    handle = load_model(str(model), weights, sample_shape, sample_dtype,
                        tokenizer=None if tokenizer is None else str(tokenizer))
    done(1)
    return handle


def _without_data(model: str | nn.Module | ModelHandle) -> bool:
    """The model brings no calibration data of its own (known from the spec alone, before loading it)."""
    if isinstance(model, ModelHandle):
        return not model.adapter.has_builtin_data
    if isinstance(model, nn.Module):
        return True
    spec = str(model)
    return is_factory_spec(spec) and not spec.startswith("builtin:") and not Path(spec).is_dir()


def precheck(model: str | nn.Module | ModelHandle, recipe: Recipe, *, out=None, overwrite: bool = False,
             calib=None, weights=None, dp_epsilon=None, dp_delta=None, identity=None, train=None,
             needs_calib: bool = True) -> None:
    """Every check the arguments allow alone, run before the (slow) model load: the output does not exist
    (unless overwrite), named files exist, DP options are consistent, calibration data is given when the
    recipe needs it and the model brings none."""
    from .privacy.plan import CalibrationPlan
    from .privacy.synthetic import SYNTHETIC

    _check_out(out, overwrite)
    for f, flag in ((weights, "--weights"), (identity, "--identity"), (train, "--train")):
        if f is not None and not Path(f).exists():
            raise SecquantError(f"{flag} {f}: no such file")
    if calib is not None and calib != SYNTHETIC and not Path(calib).exists():
        raise CalibrationError(f"--calib {calib}: no such file")
    CalibrationPlan.check_options(calib, dp_epsilon, dp_delta)
    if needs_calib and recipe.needs_calibration and calib is None and _without_data(model):
        raise CalibrationError(f"recipe {recipe.name!r} needs calibration data (static activation ranges or "
                               "scale search) and this model brings none: pass --calib FILE (or --calib synthetic "
                               "for data-free calibration)")


def _check_out(out: str | Path | None, overwrite: bool) -> None:
    """Fail before any work when the output exists (the write itself is atomic anyway)."""
    if out is not None:
        refuse_existing(out, overwrite)


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
    dp_delta: float | None = None,
    identity: str | Path | None = None,
    passphrase: str | None = None,
    record_source_name: bool = False,
    tokenizer: str | Path | None = None,
    sample_shape: Any = None,
    sample_dtype: Any = None,
    strict: bool = False,
) -> QuantizedModel:
    """Quantize a model by preset name, recipe file or Recipe; save the artifact if `out` is given.

    `tokenizer`: a directory holding the tokenizer of a Hugging Face model directory that has none (such a
    directory is refused otherwise: every word would be an unknown token).

    The manifest's `float_layers` lists every module left in float, with the reason. `strict=True` refuses
    (`StrictError`, nothing written) when a module holding a weight matrix or kernel stays in float without the
    recipe asking for it (see quant.algorithms.coverage).

    `calib`: a data file (an `.age` file is decrypted in memory with `identity`), or "synthetic"
    for data-free calibration (random vocabulary sentences / ZeroQ inputs). `dp_epsilon` (with
    `dp_delta`, default `privacy.budget.DEFAULT_DELTA`, below 1/n) calibrates static activation ranges
    with differential privacy on `calib`: every other data-reading step runs on synthetic inputs only,
    and the privacy ledger records the budget spent (epsilon = 0 when the recipe reads no private data).
    The manifest identifies `calib` by hash; its name only with `record_source_name=True`.
    `sample_shape` / `sample_dtype` (factory models and modules): the input of one sample, without the
    batch dimension, when the model has no `sample_shape` / `sample_dtype` attribute (recorded in the
    manifest; see secquant.models.inputs). Everything the arguments allow is checked before the model loads.
    """
    from .privacy.encrypted_data import plaintext_path

    recipe = resolve_recipe(recipe)
    precheck(model, recipe, out=out, overwrite=overwrite, calib=calib, weights=weights, dp_epsilon=dp_epsilon,
             dp_delta=dp_delta, identity=identity)
    handle = _handle(model, weights, progress, sample_shape, sample_dtype, tokenizer)
    with plaintext_path(calib, identity, passphrase) as data:
        qmodule, layers, calibration, privacy, key = _quantize(handle, recipe, calib, data, progress, dp_epsilon,
                                                               dp_delta, record_source_name)
    leftovers = float_layers(qmodule, recipe, layers)
    if strict:
        check_strict(qmodule, leftovers)
    qm = _finish(qmodule, handle, recipe, layers, source_entry(handle.module), calibration, out, overwrite,
                 tuning=tuning, privacy=privacy, float_layers=leftovers)
    qm.source_commitment_key = key
    return qm


def check_strict(qmodule: nn.Module, leftovers: list[dict]) -> None:
    """Raise StrictError naming the modules with weights that stayed in float (strict mode)."""
    bad = strict_violations(qmodule, leftovers)
    if bad:
        shown = ", ".join(f"{e['name'] or '(model)'} ({e['type']}, {e['parameters']} parameters: {e['reason']})"
                          for e in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise StrictError(f"strict: {len(bad)} module(s) with weights would stay in float: {shown}{more}; nothing "
                          "was written. Leave them out on purpose (recipe `ignore`) or drop --strict")


def _finish(qmodule: nn.Module, handle: ModelHandle, recipe: Recipe, layers: dict, source: SourceEntry,
            calibration: CalibrationEntry, out, overwrite: bool, **manifest_fields) -> QuantizedModel:
    """The QuantizedModel, saved as an artifact directory when `out` is given (else manifest only)."""
    if out is None:
        manifest = build_manifest(handle, recipe, layers, source, calibration, files={}, module=qmodule,
                                  **manifest_fields)
        return QuantizedModel(qmodule, manifest, handle)
    manifest = save_artifact(Path(out), qmodule, handle, recipe, layers, source, calibration, overwrite,
                             **manifest_fields)
    return QuantizedModel(qmodule, manifest, handle, Path(out))


def _quantize(handle: ModelHandle, recipe: Recipe, calib, data, progress: Progress, dp_epsilon, dp_delta,
              record_source_name: bool = False):
    """(quantized module, layers, calibration entry, privacy ledger entries, commitment key) for one recipe run."""
    from .privacy.plan import CalibrationPlan

    plan = CalibrationPlan.decide(recipe, handle, calib, dp_epsilon, dp_delta)
    qmodule = copy.deepcopy(handle.module).eval()
    try:
        layers, n_samples = quantize_model(qmodule, recipe, plan.stage_batches(recipe, handle, data), handle.run,
                                           progress)
        privacy = plan.spend(qmodule, layers, recipe, handle, data, progress)
    except SecquantError:
        raise
    except (RuntimeError, ValueError) as e:
        raise CalibrationError(f"quantization failed: the calibration data does not fit the model "
                               f"({str(e).splitlines()[0]})") from None
    calibration, key = plan.record(layers, n_samples, handle, record_source_name)
    return qmodule, layers, calibration, privacy, key


def load(path: str | Path, *, model: nn.Module | None = None, factory: str | None = None,
         identity: str | Path | None = None, verify_key: str | Path | None = None,
         passphrase: str | None = None, allow_unsealed: bool = False,
         min_release: int | None = None) -> QuantizedModel:
    """Rebuild a quantized model from a sealed file or, with `allow_unsealed=True`, a plain
    artifact directory (no pickle; hashes verified first).

    A sealed file needs `identity` (age key) and `verify_key` (signer's public key); it is
    decrypted and verified in a private directory on a memory-backed file system (/dev/shm),
    loaded, and the plaintext removed: it never reaches a disk. `min_release=N` refuses a sealed
    model whose signed release number is below N (a rollback); the model's release is in
    `qm.release`. A plain directory carries no signature, so loading one is an explicit choice
    of the caller.
    """
    p = Path(path)
    if p.is_file():
        return _load_sealed(p, identity, verify_key, passphrase, model, factory, min_release)
    if min_release is not None:
        raise SecquantError(f"{p} is a plain artifact directory: its release number is not signed, so min_release "
                            "(--min-release) applies to sealed files only")
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


def _load_sealed(p: Path, identity, verify_key, passphrase, model, factory, min_release=None) -> QuantizedModel:
    from .security import open_sealed, read_release

    if identity is None or verify_key is None:
        raise SecquantError(f"{p} is a file, so it is opened as a sealed model: give the age identity and the "
                            "signer's public key (--identity KEY --verify-key PUB, or identity= and verify_key=)")
    with private_dir("load", "use `secquant open` to write a verified artifact directory, then load that") as work:
        art = open_sealed(p, identity, verify_key, work / "artifact", identity_passphrase=passphrase,
                          min_release=min_release)
        la = load_artifact(art, model=model, factory=factory)
        return QuantizedModel(la.module, la.manifest, la.handle, None, _integrity_guard(la), read_release(art))


def reference_model(qm: QuantizedModel, against: str | nn.Module | None = None, weights: str | None = None) -> nn.Module:
    """The float model to compare against, checked against the source hash the manifest records.

    Nothing a manifest names is imported or called: an artifact made from a built-in is compared with
    secquant's own copy, looked up in a fixed table (BUILTINS); any other source (a Hugging Face
    directory, a factory, a Python module) must be named by the caller (`against=`, CLI `--against`,
    with `--weights` for a factory), and a float model whose weights differ from the ones the artifact
    was made from is refused.
    """
    src = qm.manifest.model.spec
    if isinstance(against, nn.Module):
        ref, named = against.eval(), "the given float module"
    elif against is not None:
        ref, named = load_model(str(against), weights, tokenizer=_artifact_tokenizer(qm, against)).module, \
            str(against)
    elif src in BUILTINS:
        if weights is not None:
            raise ModelError(f"this artifact was quantized from {src}, which carries its own weights: drop --weights "
                             "(it is for factory models)")
        ref, named = BUILTINS[src]().module, src
    else:
        how = ("--against PACKAGE.MODULE:FACTORY --weights FILE (the factory and float weights it was made from)"
               if qm.manifest.model.rebuild.get("loader") == "factory" else "--against MODEL")
        raise ModelError(f"this artifact was quantized from {_shown(src)}, which is not a built-in: secquant never "
                         f"imports or opens what a manifest names, so name the float model yourself: {how} "
                         "(API: against=)")
    if state_dict_sha256(ref.state_dict()) != qm.manifest.source.weights_sha256:
        differs = "its weights hash differs from the manifest's source.weights_sha256"
        if isinstance(against, str) and _without_data(against):  # a factory spec
            if weights is None:
                raise ModelError(f"--weights is missing: {named} alone builds a model with its own initial weights "
                                 f"({differs}); pass --weights FILE with the float weights this artifact was "
                                 "quantized from (API: weights=)")
            raise ModelError(f"{named} with --weights {weights} is not the float model this artifact was quantized "
                             f"from ({differs}): pass the --weights file it was made from")
        raise ModelError(f"{named} is not the float model this artifact was quantized from ({differs}): pass the "
                         "model it was made from with --against")
    return ref


def _artifact_tokenizer(qm: QuantizedModel, against: str) -> str | None:
    """The artifact directory, as the tokenizer of a float Hugging Face directory that has none (it was quantized
    with --tokenizer: the artifact carries those files, and the float reference only needs the weights)."""
    from .models.hf import TOKENIZER_FILES

    d = Path(against)
    if qm.path is None or not d.is_dir() or any((d / n).exists() for n in TOKENIZER_FILES):
        return None
    return str(qm.path)


def _shown(text: str, limit: int = 120) -> str:
    """A manifest string fit for a message: quoted, printable, bounded."""
    t = "".join(c if c.isprintable() else "?" for c in text)
    return repr(t if len(t) <= limit else t[:limit] + "...")


def evaluate(qm: QuantizedModel, against: str | nn.Module | None = None, data: str | Path | None = None,
             weights: str | None = None, batch_size: int = 32, progress: Progress = _no_progress,
             runtime: str = "torch", threads: int = 2) -> dict[str, Any]:
    """Size, fidelity and latency of a quantized model against its float source, as a dict.

    `runtime` names the backend that runs the quantized model (secquant.runtime.BACKENDS: "torch", or
    "onnx" for ONNX Runtime with `threads` intra-op threads on the artifact's model.onnx, exported and
    registered in the manifest first if it is missing).
    """
    from .runtime.backend import backend_class

    engine = backend_class(runtime)
    ref = reference_model(qm, against, weights)
    size = (qm.path / "model.safetensors").stat().st_size if qm.path else None
    fsize = qm.manifest.source.float_size_bytes
    backend = engine.load(qm, threads=threads)
    tick = progress("evaluating", None)
    res = compare(qm.module, ref, qm.handle, data, batch_size, tick, runner=backend.run, runtime=backend.describe())
    res.update(backend.facts())
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



def generate(model: QuantizedModel, prompt: str, *, max_new_tokens: int = 32, temperature: float | None = None,
             top_k: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Text continuing `prompt`, from a quantized causal LM (`secquant.load`): greedy decoding unless
    `temperature` > 0 or `top_k` is given (sampling; `seed` makes it reproducible). Returns the new text
    ("text"), token counts and the decoding used."""
    if not isinstance(model, QuantizedModel):
        raise SecquantError("generate() takes a quantized model: secquant.load(...) or secquant.quantize(...)")
    return model.handle.adapter.generate(model.module, prompt, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, seed=seed)


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
    seed: int | None = None,
    overwrite: bool = False,
    progress: Progress = _no_progress,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    max_grad_norm: float = 1.0,
    record_source_name: bool = False,
    sample_shape: Any = None,
    sample_dtype: Any = None,
) -> QuantizedModel:
    """Quantization-aware retraining (LSQ) of a classifier on its training set; saves like quantize().

    Without DP, `seed` (default 0) makes the run reproducible. With `dp_epsilon`, retraining runs under
    DP-SGD (Opacus) and spends at most (dp_epsilon, dp_delta) on the training set (see
    secquant.privacy.dp_training for what that does and does not cover); its noise and sampling come from
    an unrecorded OS-seeded generator, so a `seed` is refused. `calib` must then be public data with no
    training sample in it (checked). Files are identified by hash; names only with `record_source_name`."""
    from .privacy.plan import file_source
    from .quant.algorithms.qat import retrain

    if epochs < 1:
        raise SecquantError("--epochs must be at least 1")
    if dp_epsilon is None and dp_delta is not None:
        raise SecquantError("--dp-delta needs --dp-epsilon")
    if dp_epsilon is not None and seed is not None:
        raise SecquantError("--seed would make a DP-SGD run replayable (the same noise and batches on the same data "
                            "release the same weights, which reveals membership whatever epsilon says): DP-SGD draws "
                            "them from an unrecorded OS-seeded generator; drop --seed, or drop --dp-epsilon for a "
                            "reproducible non-private run")
    if dp_epsilon is not None and checkpoint_dir is not None:
        raise SecquantError("--checkpoints is not supported with --dp-epsilon: drop one of them")
    recipe = resolve_recipe(recipe)
    precheck(model, recipe, out=out, overwrite=overwrite, calib=calib, weights=weights, train=train,
             needs_calib=False)  # ranges start from the training set when no --calib is given
    handle = _handle(model, weights, progress, sample_shape, sample_dtype)
    x, y = handle.adapter.train_set(train)
    float_module = handle.module
    source = source_entry(float_module)
    cal = recipe.calibration
    if dp_epsilon is not None:
        from .privacy.dp_training import dp_qat, dp_sgd_ledger_entry
        from .privacy.provenance import file_sha256

        init = handle.adapter.calibration_batches(calib, cal.num_samples, cal.batch_size) if calib else None
        qmodule, layers, training = dp_qat(
            float_module, recipe, x, y, handle.run, epochs=epochs, lr=lr, batch_size=batch_size, epsilon=dp_epsilon,
            delta=dp_delta, max_grad_norm=max_grad_norm, init_batches=init,
            init_sha256=file_sha256(calib) if calib else None,
            sample_shape=getattr(handle.adapter, "sample_shape", None), synthetic_samples=cal.num_samples,
            synthetic_seed=cal.seed, progress=progress("training (DP-SGD)", epochs))
        spent = f" (DP-SGD, epsilon={training['dp']['epsilon']:.3g}, delta={training['dp']['delta']:.3g})"
        key = None
        if train:
            fields, key = file_source(train, record_source_name, private=True, what="private training file")
            fields["source"] += spent
        else:
            fields = {"source": f"{handle.spec} training split (built-in){spent}"}
        calibration = CalibrationEntry(data="private", num_samples=None, **fields)
        qm = _finish(qmodule, handle, recipe, layers, source, calibration, out, overwrite, training=training,
                     privacy=[dp_sgd_ledger_entry(training["dp"])])
        qm.source_commitment_key = key
        return qm
    seed = 0 if seed is None else int(seed)
    qmodule, layers, losses = retrain(
        float_module, recipe, x, y, handle.adapter.calibration_batches(calib, cal.num_samples, cal.batch_size)
        if calib else None, handle.run, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        checkpoint_fn=_checkpoints(checkpoint_dir) if checkpoint_dir is not None else None,
        progress=progress("training", epochs))
    if train:
        fields, _ = file_source(train, record_source_name, private=False, what="training file")
    else:
        fields = {"source": f"{handle.spec} training split (built-in)"}
    calibration = CalibrationEntry(data="raw", num_samples=int(len(y)), **fields)
    training = {"method": "LSQ (learned step size) quantization-aware retraining, straight-through estimator",
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "train_samples": int(len(y)),
                "losses": [round(v, 6) for v in losses]}
    return _finish(qmodule, handle, recipe, layers, source, calibration, out, overwrite, training=training)


def _checkpoints(directory: str | Path) -> Callable[[int, nn.Module], None]:
    """A QAT checkpoint writer: DIR/epoch-N.safetensors after every epoch, each written whole or not at all."""
    from safetensors.torch import save_file

    cdir = Path(directory)
    cdir.mkdir(parents=True, exist_ok=True)

    def write(epoch: int, m: nn.Module) -> None:
        with atomic_file(cdir / f"epoch-{epoch}.safetensors") as tmp:
            save_file({k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}, str(tmp))

    return write
