"""Run an exported artifact with ONNX Runtime on the CPU.

    sess = Session("minilm-w8a8-dynamic", threads=2)
    emb = sess.run(batch)            # batch: the dict the encoder adapter produces
    emb = sess.encode(["a sentence"])  # encoders: tokenize with the artifact's tokenizer

The artifact is verified first (manifest, and the sha256 of every listed file, model.onnx
included), and the ONNX bytes handed to ONNX Runtime are the bytes whose hash was checked, so
a model.onnx swapped or corrupted after export is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ArtifactError, SecquantError
from .export import export_info, export_onnx
from .info import ONNX_NAME, ExportInfo, require_onnx

_CHECK_TEXTS = ["The fused graph must agree with the plain one.", "A short check.",
                "Quantized sentence encoders run on ONNX Runtime with integer kernels for the linear layers."]
# Hugging Face model types the ORT transformer optimizer has BERT-style fusions for.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "albert"}


def _transformer_optimize(model_bytes: bytes, config: dict[str, Any]):
    """ORT's transformer fusions (SkipLayerNormalization, BiasGelu; Attention and
    EmbedLayerNormalization where the pattern is plain float MatMuls and Gathers) as an in-memory
    ModelProto, with a dict of what was fused; (None, reason) when they do not apply or fail.

    ORT's symbolic shape inference does not know the com.microsoft integer operators, so for
    quantized graphs the fusions run without it; Session checks the fused graph against the
    unfused one before using it.
    """
    model_type = config.get("model_type", "")
    if model_type not in _BERT_LIKE:
        return None, f"no ORT transformer fusions for model_type {model_type!r}"
    try:
        import onnx
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions
    except ImportError as e:  # pragma: no cover - ships with onnxruntime
        return None, f"onnxruntime.transformers unavailable: {e}"
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime.transformers", "fusion_skiplayernorm", "onnx_model")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        model = onnx.load_from_string(model_bytes)
        opts = FusionOptions("bert")
        opts.enable_gelu_approximation = False  # keep erf GELU: the PyTorch model's numerics
        opts.enable_shape_inference = not any(n.domain == "com.microsoft" for n in model.graph.node)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            m = optimizer.optimize_model(model, model_type="bert",
                                         num_heads=int(config.get("num_attention_heads", 0) or 0),
                                         hidden_size=int(config.get("hidden_size", 0) or 0),
                                         optimization_options=opts, opt_level=0, use_gpu=False)
        model = m.model
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return model, {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    except Exception as e:  # the plain model still runs
        return None, f"transformer optimizer failed: {type(e).__name__}: {e}"
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _tensors(graph):
    """Every TensorProto an ONNX graph holds: initializers, sparse initializers, Constant-style attributes,
    and the same inside subgraphs (If/Loop/Scan bodies), at any depth."""
    for t in graph.initializer:
        yield t
    for st in graph.sparse_initializer:
        yield st.values
        yield st.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def check_external_data(model, allowed: set[str]) -> None:
    """Refuse an ONNX model any of whose tensors reads external data from a file other than `allowed`.

    ONNX Runtime resolves an external data location against the model's directory, or against the process's
    working directory when the model is given as bytes: a model.onnx naming `SECRET.txt` or
    `../../etc/shadow` would feed a file outside every hash into the weights. The only external data an
    artifact may use is its own, hashed `model.onnx.data`."""
    from onnx import TensorProto

    for t in _tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in t.external_data}.get("location", "")
        if where not in allowed:
            raise ArtifactError(f"{ONNX_NAME}: tensor {t.name[:80]!r} reads external data from "
                                f"{where[:120]!r}, which is not this artifact's own hashed "
                                f"{ONNX_NAME}.data: refusing to run it (re-export the artifact)")


class Session:
    """ONNX Runtime inference on CPU for a secquant artifact (exported on first use).

    `threads` sets intra_op_num_threads; `optimize` turns on all of ORT's graph optimizations
    (ORT_ENABLE_ALL: QDQ fusion into integer kernels, Add + Gelu -> BiasGelu, constant folding,
    layouts). `transformer_fusions=True` also runs onnxruntime.transformers' BERT optimizer
    (SkipLayerNormalization, Attention, EmbedLayerNormalization); it is off by default because on
    the 2-core AVX-512 machine it was measured on it did not pay: fp32 MiniLM ran at the same speed
    and the quantized graphs 15-20% slower (ORT's SkipLayerNormalization kernel took ~3 ms where
    LayerNormalization + Add took ~0.6 ms). The fused graph is used only if it agrees with the plain
    one on a sample. `export=False` raises instead of exporting a missing model.onnx; other keyword
    arguments go to export_onnx.
    """

    def __init__(self, artifact_dir: str | os.PathLike, threads: int = 2, optimize: bool = True, *,
                 export: bool = True, transformer_fusions: bool = False, **export_kwargs) -> None:
        require_onnx()
        import onnxruntime as ort

        from ...artifact.checks import verify_artifact_dir

        self.path = Path(artifact_dir)
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path} is not an artifact directory")
        if threads < 1:
            raise SecquantError("threads must be at least 1")
        onnx_path = self.path / ONNX_NAME
        if not onnx_path.is_file():
            if not export:
                raise SecquantError(f"{onnx_path} does not exist: export it first "
                                    f"(secquant.runtime.export_onnx({str(self.path)!r}))")
            export_onnx(self.path, **export_kwargs)
        manifest = verify_artifact_dir(self.path)
        if ONNX_NAME not in manifest.files:
            raise ArtifactError(f"{onnx_path} is not listed in the artifact's manifest: re-export it with "
                                "secquant.runtime.export_onnx")
        self.manifest = manifest
        self.kind = manifest.model.kind
        self.info: ExportInfo | None = export_info(onnx_path)
        self.threads, self.optimize = threads, optimize
        self.fusions: Any = None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        self._adapter = None
        import onnx

        data_name = ONNX_NAME + ".data"
        external = data_name in manifest.files  # listed, hence present and hashed by verify_artifact_dir
        model_bytes = onnx_path.read_bytes()
        if hashlib.sha256(model_bytes).hexdigest() != manifest.files[ONNX_NAME]:
            raise ArtifactError(f"{onnx_path}: content does not match the manifest's sha256 (modified or corrupted)")
        try:
            proto = onnx.load_model_from_string(model_bytes)
        except Exception as e:  # protobuf's DecodeError and friends
            raise ArtifactError(f"{onnx_path} is not a valid ONNX model: {str(e)[:200]}") from None
        check_external_data(proto, {data_name} if external else set())
        if external:  # ORT reads the tensors from the (verified) data file next to the model
            self._sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        else:  # run exactly the bytes whose hash matches the manifest
            self._sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_name = self._sess.get_outputs()[0].name
        if optimize and transformer_fusions and not external:  # BERT-like configs only (see _transformer_optimize)
            proto, self.fusions = _transformer_optimize(model_bytes, self._config())
            if proto is not None:
                self._use_if_consistent(ort.InferenceSession(proto.SerializeToString(), so,
                                                             providers=["CPUExecutionProvider"]))

    def _use_if_consistent(self, fused) -> None:
        """Switch to the transformer-fused session only if it reproduces the plain one on a sample."""
        from .export import agreement, agrees

        try:
            batch = self._adapter_for().encode(_CHECK_TEXTS)
            plain = self.run(batch)
            feeds = self._feeds(batch)
            got = torch.from_numpy(fused.run([self.output_name], feeds)[0])
            v = agreement(got, plain)
        except Exception as e:
            self.fusions = f"not used: the fused graph failed on a sample ({type(e).__name__}: {e})"
            return
        if agrees(v):
            self._sess = fused
        else:
            self.fusions = ("not used: the fused graph disagrees with the plain one "
                            f"(mean cosine {v['mean_cosine']:.6f})")

    def _adapter_for(self):
        """The model kind's adapter for this artifact (tokenizer, input shape), made on first use."""
        if self._adapter is None:
            from ...models import adapter_for_artifact

            m = self.manifest.model
            self._adapter = adapter_for_artifact(self.path, m.kind, m.rebuild)
        return self._adapter

    def _config(self) -> dict[str, Any]:
        p = self.path / "config.json"
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def _feeds(self, batch) -> dict[str, np.ndarray]:
        return self._adapter_for().feeds(batch, self.input_names)

    def run(self, batch) -> torch.Tensor:
        """Outputs for one batch (logits for classifiers, embeddings for encoders) as a float tensor."""
        out = self._sess.run([self.output_name], self._feeds(batch))[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    __call__ = run

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Outputs for raw texts, tokenized with the artifact's own tokenizer (text models: encoders)."""
        return self.run(self._adapter_for().encode(list(texts)))

    @property
    def fallbacks(self) -> list:
        """Layers exported with dequantized float weights (ExportInfo.fallbacks of the model)."""
        return self.info.fallbacks if self.info else []

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, kind={self.kind}, threads={self.threads}, optimize={self.optimize})"


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


__all__ = ["Session"]
