#!/usr/bin/env python
"""Causal LM benchmark: held-out perplexity of secquant's presets vs peers, on one small Llama-style model.

Run from the repository root:

    .venv/bin/python bench/causal_lm.py [--steps N] [--max-train-s S] [--eval-tokens N]

Everything is local (no downloads): a byte-level BPE tokenizer (tokenizers, vocabulary 2048) and a
Llama-style causal LM (transformers LlamaConfig: 4 layers, hidden 128, MLP 512, 4 heads, untied head; ~1.6M
parameters) are trained in the script, for --steps AdamW steps of 8 x 128 tokens (fewer if --max-train-s runs out; the
learning rate anneals to zero either way), on secquant's built-in
sentences plus the docstrings of Python's own standard library and scikit-learn's dataset descriptions
(DESCR). Documents are split by a hash of their name: ~8% held out for perplexity, the rest for training and
calibration (GPTQ / AWQ-style presets read 32 training windows).

Perplexity: exp(mean next-token NLL) over non-overlapping 128-token windows of the held-out token stream
(--eval-tokens tokens in all), every method on the same windows of the same trained model; also the mean
KL(float || method) of the next-token distributions and the top-1 next-token agreement with the float model
(more sensitive than perplexity on a model this small):

  * float (fp32);
  * secquant presets w8a16, w8a8-dynamic, w4a16, w4a16-gptq, w3a16-gptq (secquant.quant.algorithms.pipeline.
    quantize_model on the transformers model; presets quantize every Linear, lm_head included, and the token
    embedding table), and w4a16 / w4a16-gptq again on the Linear layers only (like the peers);
  * secquant w4a16 exported by secquant.runtime.export_causal_onnx and run by ONNX Runtime (MatMulNBits);
  * torchao int8 / int4 weight-only (Int8WeightOnlyConfig, Int4WeightOnlyConfig g128, IntxWeightOnlyConfig int4
    g128 asymmetric), optimum-quanto (qint8, qint4 weights), hqq (HQQLinear 4-bit g128), ONNX Runtime's
    quantize_dynamic (int8 weights, dynamic int8 activations) on the float ONNX export -- peers quantize the
    nn.Linear layers (lm_head included) and leave the embedding in float.

A peer that fails on this CPU is a row with its error. Sizes: torch.save(state_dict) bytes for PyTorch models,
the .onnx file for ONNX Runtime rows; ratio to the float state dict. Prints a markdown table and replaces the
"## Causal LM" section of bench/RESULTS.md (command, date, machine, contention note).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import io
import itertools
import logging
import math
import os
import pkgutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# One thread: on the shared 2-core machine a 2-thread pool slows down ~10x whenever another process holds a core
# (measured 4.5 s against 0.5 s per training step); results do not depend on it.
THREADS = 1
torch.set_num_threads(THREADS)

from machine import cpu_counters, machine_line, other_load, replace_section, source_fingerprint  # noqa: E402
from secquant.quant.algorithms.pipeline import quantize_model  # noqa: E402
from secquant.recipes.presets import PRESETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corpus and tokenizer

def _stdlib_docs() -> dict[str, str]:
    """name -> docstring text of the standard library's pure-Python modules, their classes and functions."""
    import importlib

    docs: dict[str, str] = {}
    stdlib = Path(os.__file__).parent
    skip = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "antigravity", "this")
    for info in pkgutil.iter_modules([str(stdlib)]):
        if info.name.startswith("_") or info.name in skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        parts = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod, lambda o: inspect.isclass(o) or inspect.isfunction(o)):
            if getattr(obj, "__module__", None) == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")
        text = "\n\n".join(p for p in parts if len(p) > 40)
        if text:
            docs[f"stdlib:{info.name}"] = text
    return docs


def corpus() -> tuple[list[str], list[str]]:
    """(training documents, held-out documents), split by a hash of each document's name."""
    from importlib import resources

    import sklearn.datasets as skd

    docs = _stdlib_docs()
    for f in ["load_iris", "load_diabetes", "load_digits", "load_wine", "load_breast_cancer", "load_linnerud"]:
        docs[f"sklearn:{f}"] = getattr(skd, f)().DESCR
    lines = [s for s in resources.files("secquant.data").joinpath("sentences.txt").read_text().splitlines() if s]
    for i in range(0, len(lines), 16):
        docs[f"sentences:{i}"] = "\n".join(lines[i:i + 16])
    train, held = [], []
    for name in sorted(docs):
        (held if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < 8 else train).append(docs[name])
    return train, held


def train_tokenizer(texts: list[str], vocab: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id("<eos>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, n: int | None = None) -> torch.Tensor:
    w = stream[: len(stream) // SEQ * SEQ].reshape(-1, SEQ)
    return w if n is None else w[:n]


# --------------------------------------------------------------------------- model

def build_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train(model, train_windows: torch.Tensor, steps: int, max_s: float, batch: int = 8,
          max_lr: float = 3e-3) -> tuple[float, int]:
    """AdamW, linear warm-up then cosine decay to zero over the run's progress = max(step / steps, elapsed /
    max_s): `steps` steps, or fewer when `max_s` seconds run out first (a busy machine trains fewer steps, but the
    learning rate still anneals to zero; the section says how many steps ran)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=0.01)
    model.train()
    loss = float("nan")
    start = time.time()
    done = 0
    for step in range(steps):
        progress = max(step / steps, (time.time() - start) / max_s)
        if progress >= 1.0:
            log(f"training stopped at step {step}: --max-train-s {max_s:.0f} reached")
            break
        lr = max_lr * (progress / 0.05 if progress < 0.05 else 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train_windows), (batch,), generator=g)
        x = train_windows[idx]
        out = model(input_ids=x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(out.loss)
        done = step + 1
        if step % 100 == 0 or step == steps - 1:
            log(f"train step {step}/{steps} loss {loss:.3f} lr {lr:.2e}")
    return loss, done


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(fn, eval_windows: torch.Tensor, ref: list[torch.Tensor] | None, batch: int = 8) -> dict:
    """Perplexity of `fn` on the windows; with `ref` (the float model's log-probabilities per batch) also the mean
    KL(float || method) per predicted token and the top-1 next-token agreement with float. Keeps the log-probs
    in `ref` when it is an empty list (the float row)."""
    total = kl = agree = 0.0
    n = 0
    keep = ref is not None and not ref
    for j, i in enumerate(range(0, len(eval_windows), batch)):
        x = eval_windows[i:i + batch]
        lp = torch.log_softmax(torch.as_tensor(fn(x))[:, :-1].float(), -1)
        total += float(-lp.gather(-1, x[:, 1:, None]).sum())
        n += x[:, 1:].numel()
        if keep:
            ref.append(lp)
        elif ref is not None:
            r = ref[j]
            kl += float((r.exp() * (r - lp)).sum())
            agree += float((r.argmax(-1) == lp.argmax(-1)).sum())
    out = {"ppl": math.exp(total / n)}
    if ref is not None and not keep:
        out.update(kl=kl / n, top1=agree / n)
    return out


def torch_fn(model):
    model.eval()
    return lambda x: model(input_ids=x).logits


def ort_fn(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input_ids": x.numpy().astype(np.int64),
                                     "attention_mask": np.ones(tuple(x.shape), np.int64)})[0]


def state_size(model) -> int | str:
    try:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.tell()
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"


def short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:160]}"


# --------------------------------------------------------------------------- the methods

def secquant_rows(float_model, calib: torch.Tensor, tmp: Path, sample: torch.Tensor):
    batches = [{"input_ids": calib[i:i + 16]} for i in range(0, len(calib), 16)]
    runs = [(p, PRESETS[p], "") for p in ["w8a16", "w8a8-dynamic", "w4a16", "w4a16-gptq", "w3a16-gptq"]]
    # like for like with the peers, which leave the embedding table in float
    runs += [(p, PRESETS[p].model_copy(update={"targets": ["Linear"]}), " (Linear only)") for p in ["w4a16", "w4a16-gptq"]]
    for preset, r, scope in runs:
        bits = r.weights.bits
        desc = r.description + (" (Linear layers only, embedding in float)" if scope else " (+ embedding table)")
        m = copy.deepcopy(float_model).eval()
        t = time.time()
        try:
            quantize_model(m, r, lambda: iter(batches), lambda mod, b: mod(**b).logits)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            yield dict(method=f"secquant {preset}{scope}", bits=bits, error=short_error(e), note=desc)
            continue
        qs = time.time() - t
        log(f"secquant {preset}{scope}: quantized in {qs:.0f} s")
        yield dict(method=f"secquant {preset}{scope}", bits=bits, fn=torch_fn(m), size=state_size(m),
                   note=f"{desc}; quantized in {qs:.0f} s")
        if preset == "w4a16" and not scope:
            try:
                from secquant.runtime.onnx import export_causal_onnx

                p = export_causal_onnx(m, {"input_ids": sample, "attention_mask": torch.ones_like(sample)},
                                       tmp / "secquant-w4a16.onnx")
                yield dict(method="secquant w4a16 -> ONNX Runtime", bits=4, fn=ort_fn(p), size=p.stat().st_size,
                           note="export_causal_onnx: MatMulNBits per Linear, GatherBlockQuantized embedding; "
                                "no KV cache")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                yield dict(method="secquant w4a16 -> ONNX Runtime", bits=4, error=short_error(e))


def _peer(method, bits, apply, float_model, note=""):
    m = copy.deepcopy(float_model).eval()
    try:
        with torch.no_grad():
            apply(m)
        fn = torch_fn(m)
        with torch.no_grad():
            fn(torch.zeros(1, 8, dtype=torch.long))  # fails here if the kernels do not run on this CPU
        return dict(method=method, bits=bits, fn=fn, size=state_size(m), note=note)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return dict(method=method, bits=bits, error=short_error(e), note=note)


def peer_rows(float_model, tmp: Path, sample: torch.Tensor):
    from importlib.metadata import version

    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig,
                                          MappingType, PerGroup, quantize_)

        tao = f"torchao {version('torchao')}"
        yield _peer(f"{tao} Int8WeightOnlyConfig", 8, lambda m: quantize_(m, Int8WeightOnlyConfig()), float_model,
                    "int8 per-channel weight-only")
        yield _peer(f"{tao} Int4WeightOnlyConfig g128", 4,
                    lambda m: quantize_(m, Int4WeightOnlyConfig(group_size=128, set_inductor_config=False)),
                    float_model, "default int4 packing (tinygemm / CUDA-oriented)")
        yield _peer(f"{tao} IntxWeightOnlyConfig int4 g128", 4,
                    lambda m: quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128),
                                                                mapping_type=MappingType.ASYMMETRIC)),
                    float_model, "asymmetric min-max RTN, codes stored unpacked in int8")
    except Exception as e:  # noqa: BLE001
        yield dict(method="torchao", bits="-", error=short_error(e), note="import failed")
    try:
        import optimum.quanto as oq

        qto = f"optimum-quanto {version('optimum-quanto')}"

        def quanto(dt):
            def f(m):
                oq.quantize(m, weights=dt)
                oq.freeze(m)
            return f

        yield _peer(f"{qto} qint8", 8, quanto(oq.qint8), float_model, "quantize(weights=qint8) + freeze")
        yield _peer(f"{qto} qint4", 4, quanto(oq.qint4), float_model,
                    "quantize(weights=qint4) + freeze (group size 128)")
    except Exception as e:  # noqa: BLE001
        yield dict(method="optimum-quanto", bits="-", error=short_error(e), note="import failed")
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH)

        def hqq(m):
            cfg = BaseQuantizeConfig(nbits=4, group_size=128)
            for name, mod in list(m.named_modules()):
                if isinstance(mod, nn.Linear):
                    m.set_submodule(name, HQQLinear(mod, cfg, compute_dtype=torch.float32, device="cpu"))

        yield _peer(f"hqq {version('hqq')} 4-bit g128", 4, hqq, float_model,
                    "HQQLinear(BaseQuantizeConfig(nbits=4, group_size=128)), PYTORCH backend, fp32 compute")
    except Exception as e:  # noqa: BLE001
        yield dict(method="hqq", bits="-", error=short_error(e), note="import failed")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from secquant.runtime.onnx import export_causal_onnx

        fp = export_causal_onnx(float_model, {"input_ids": sample, "attention_mask": torch.ones_like(sample)},
                                tmp / "float.onnx", quantized=False)
        yield dict(method="fp32 ONNX Runtime", bits=32, fn=ort_fn(fp), size=fp.stat().st_size,
                   note="export_causal_onnx(quantized=False)")
        for per_channel in (False, True):
            q = tmp / f"ort-dyn-{per_channel}.onnx"
            quantize_dynamic(str(fp), str(q), weight_type=QuantType.QInt8, per_channel=per_channel)
            yield dict(method=f"ORT quantize_dynamic QInt8{' per-channel' if per_channel else ''}", bits=8,
                       fn=ort_fn(q), size=q.stat().st_size,
                       note="int8 weights + dynamic int8 activations (MatMulInteger) on the float ONNX export")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        yield dict(method="ORT quantize_dynamic", bits=8, error=short_error(e))


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-train-s", type=float, default=240.0, help="stop training early after this many seconds")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    cpu0 = cpu_counters()
    train_docs, held_docs = corpus()
    tok = train_tokenizer(train_docs)
    tr, he = token_stream(tok, train_docs), token_stream(tok, held_docs)
    train_w, eval_w = windows(tr), windows(he, args.eval_tokens // SEQ)
    log(f"corpus: {len(train_docs)} training documents ({len(tr)} tokens), {len(held_docs)} held out "
        f"({len(he)} tokens, {len(eval_w) * SEQ} evaluated)")
    model = build_model(tok.get_vocab_size())
    n_params = sum(p.numel() for p in model.parameters())
    t = time.time()
    final_loss, steps_done = train(model, train_w, args.steps, args.max_train_s)
    train_s = time.time() - t
    model.eval()
    calib = train_w[torch.randperm(len(train_w), generator=torch.Generator().manual_seed(1))[:32]]
    sample = eval_w[:2, :16]
    rows = []
    first = [dict(method="float (fp32 PyTorch)", bits=32, fn=torch_fn(model), size=state_size(model), note="")]
    ref: list[torch.Tensor] = []  # the float model's log-probabilities, filled by the first row
    with tempfile.TemporaryDirectory() as td:
        for row in itertools.chain(first, secquant_rows(model, calib, Path(td), sample),
                                   peer_rows(model, Path(td), sample)):
            if "fn" in row:
                t = time.time()
                try:
                    row.update(evaluate(row.pop("fn"), eval_w, ref))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    row["error"] = short_error(e)
                row["eval_s"] = time.time() - t
            rows.append(row)
            log(f"{row['method']}: " + (f"ppl {row['ppl']:.3f} KL {row.get('kl', 0):.5f} top-1 {row.get('top1', 1):.4f}"
                                         if "ppl" in row else row["error"]))
    total_s = time.time() - T0
    fppl, fsize = rows[0]["ppl"], rows[0]["size"]
    lines = ["| method | bits | perplexity | ratio to float | KL to float | top-1 vs float | size (bytes) | size vs float "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ppl" in r:
            size = r["size"]
            sv = f"{size / fsize:.2f}x" if isinstance(size, int) else "-"
            kl = f"{max(r['kl'], 0.0):.5f}" if "kl" in r else "-"
            top1 = f"{r['top1']:.4f}" if "top1" in r else "-"
            lines.append(f"| {r['method']} | {r['bits']} | {r['ppl']:.3f} | {r['ppl'] / fppl:.4f} | {kl} | {top1} | "
                         f"{size} | {sv} | {r.get('note', '')} |")
        else:
            lines.append(f"| {r['method']} | {r['bits']} | FAILED | - | - | - | - | - | {r['error']}"
                         f"{'; ' + r['note'] if r.get('note') else ''} |")
    table = "\n".join(lines)
    print(table)
    cmd = "PYTHONPATH=src .venv/bin/python bench/causal_lm.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in [("steps", args.steps), ("max_train_s", f"{args.max_train_s:g}"), ("eval_tokens", args.eval_tokens)])
    section = (
        "## Causal LM\n\n"
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {total_s:.0f} s in all).\n\n"
        f"Model: Llama-style (transformers LlamaConfig: 4 layers, hidden 128, MLP 512, 4 heads, untied head, "
        f"{n_params / 1e6:.1f}M parameters) with a byte-level BPE tokenizer (vocabulary {tok.get_vocab_size()}), "
        f"both trained in the script ({steps_done} of {args.steps} AdamW steps of 8 x {SEQ} tokens, {train_s:.0f} s, final training "
        f"loss {final_loss:.2f}) on the built-in sentences, Python's standard-library docstrings and scikit-learn's "
        f"dataset descriptions; no downloads. Perplexity: exp(mean next-token NLL) over {len(eval_w)} non-overlapping "
        f"{SEQ}-token windows of held-out documents (split by document), the same windows for every method. "
        "KL to float: mean KL(float || method) of the next-token distributions per predicted token; top-1 vs float: "
        "the fraction of positions whose most likely next token is the float model's. "
        "Calibrated presets (w4a16, w4a16-gptq, w3a16-gptq) read 32 training windows. secquant presets also quantize "
        "the token embedding table (at the preset's bits); the peers quantize nn.Linear layers only (lm_head included), "
        "as do the secquant rows marked (Linear only). Sizes: "
        "torch.save(state_dict), or the .onnx file.\n\n"
        f"{table}\n\n"
        f"Machine: {machine_line(THREADS)}. {other_load(cpu0, total_s)}. Source: {source_fingerprint()}.\n")
    if not args.no_write:
        replace_section(ROOT / "bench" / "RESULTS.md", "Causal LM", section)
        log("wrote the Causal LM section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
