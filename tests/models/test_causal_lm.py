"""Causal language models (kind: causal-lm) and Hugging Face loading through transformers: tiny Llama-, GPT-2- and
Qwen2-style models built and trained by the tests (causal_lm_fixtures), quantized with every LLM preset, evaluated
(perplexity, KL divergence, top-1 agreement) and run (generate)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from causal_lm_fixtures import tiny_causal_lm
from safetensors.torch import load_file

import secquant
from secquant.errors import ModelError
from secquant.models import load_model
from secquant.models.encoder import builtin_sentences

# every preset the issue names, spread over the three styles (each style gets an 8-bit and a GPTQ preset)
CASES = [("llama", "w8a16"), ("llama", "w4a16-gptq"), ("llama", "w3a16-gptq"), ("gpt2", "w8a8-dynamic"),
         ("gpt2", "w4a16-gptq"), ("qwen2", "w4a16"), ("qwen2", "w3a16-gptq")]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(style, preset) -> artifact directory, quantized once per module."""
    root = tmp_path_factory.mktemp("lm-artifacts")
    made: dict[tuple[str, str], Path] = {}

    def get(style: str, preset: str) -> Path:
        if (style, preset) not in made:
            secquant.quantize(str(tiny_causal_lm(style)), preset, out=root / f"{style}-{preset}")
            made[style, preset] = root / f"{style}-{preset}"
        return made[style, preset]

    return get


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen2"])
def test_loaded_as_causal_lm_with_lm_head_and_saved_weights(style):
    d = tiny_causal_lm(style)
    h = load_model(str(d))
    assert h.kind == "causal-lm" and h.adapter.task == "generate"
    assert h.rebuild["loader"] == "hf-causal-lm" and h.rebuild["model_type"] == style
    assert h.rebuild["tie_word_embeddings"] is True
    saved = load_file(str(d / "model.safetensors"))
    sd = h.module.state_dict()
    for k, v in saved.items():
        assert torch.equal(sd[k], v), k
    batch = h.adapter.encode(["Lightning struck the old oak tree."])
    logits = h.run(h.module, batch)
    # next-token logits, not a pooled sentence vector
    assert logits.shape == (*batch["input_ids"].shape, len(h.adapter.tokenizer))
    assert set(h.arch_files) >= {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}


def test_decoder_tokenizer_without_pad_pads_with_eos_on_the_right():
    from transformers import AutoTokenizer

    d = tiny_causal_lm("gpt2")
    assert AutoTokenizer.from_pretrained(str(d)).pad_token is None  # as GPT-2's own tokenizer
    h = load_model(str(d))
    tok = h.adapter.tokenizer
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    short, long_ = "The cat sat.", "Lightning struck the old oak tree near the river at night."
    both = h.adapter.encode([short, long_])
    alone = h.adapter.encode([short])
    n = int(alone["attention_mask"].sum())
    assert both["attention_mask"][0, :n].all() and not both["attention_mask"][0, n:].any()
    with torch.no_grad():
        torch.testing.assert_close(h.run(h.module, both)[0, :n], h.run(h.module, alone)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("style,preset", CASES)
def test_quantize_eval_generate(artifacts, style, preset):
    art = artifacts(style, preset)
    qm = secquant.load(art, allow_unsealed=True)
    assert qm.manifest.model.kind == "causal-lm"
    layers = qm.manifest.layers
    assert "lm_head" in layers  # the output projection is quantized, not dropped
    if preset.endswith("gptq"):
        assert all("gptq" in e.config for n, e in layers.items() if e.source_type in ("Linear", "Conv1D"))
    res = secquant.evaluate(qm, against=str(tiny_causal_lm(style)))
    assert res["metric"] == "perplexity"
    vocab = len(qm.handle.adapter.tokenizer)
    assert res["float_value"] < 0.4 * vocab  # the trained model is far better than uniform guessing
    bits = 8 if preset.startswith("w8") else int(preset[1])
    assert 0.97 < res["value"] / res["float_value"] < (1.01 if bits == 8 else 1.05)
    assert 0 <= res["kl_divergence"] < (0.001 if bits == 8 else 0.05)
    assert res["top1_agreement"] > (0.97 if bits == 8 else 0.8)
    assert res["n_tokens"] > 5000
    out = secquant.generate(qm, "The city council", max_new_tokens=8)
    assert out["decoding"] == "greedy" and out["generated_tokens"] <= 8 and out["prompt_tokens"] > 0
    assert secquant.generate(qm, "The city council", max_new_tokens=8) == out  # greedy is deterministic


def test_perplexity_is_transformers_own_loss(artifacts):
    """The float perplexity `eval` reports is exp of transformers' mean token loss on the same texts."""
    d = tiny_causal_lm("llama")
    qm = secquant.load(artifacts("llama", "w8a16"), allow_unsealed=True)
    res = secquant.evaluate(qm, against=str(d), batch_size=256)
    h = load_model(str(d))
    enc = h.adapter.encode(builtin_sentences()[0])
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = h.module(**enc, labels=labels).loss
    assert math.isclose(res["float_value"], math.exp(float(loss)), rel_tol=1e-4)
    assert res["n_samples"] == 256


def test_eval_data_file_and_w4_differs_from_float(artifacts, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("\n".join(builtin_sentences()[0][:40]) + "\n", encoding="utf-8")
    qm = secquant.load(artifacts("qwen2", "w4a16"), allow_unsealed=True)
    res = secquant.evaluate(qm, against=str(tiny_causal_lm("qwen2")), data=data)
    assert res["n_samples"] == 40 and res["kl_divergence"] > 0 and res["top1_agreement"] < 1.0


def test_sampling_is_seeded(artifacts):
    qm = secquant.load(artifacts("llama", "w8a16"), allow_unsealed=True)
    a = secquant.generate(qm, "The city", max_new_tokens=12, temperature=1.5, seed=1)
    assert a["decoding"] == "sampling"
    assert secquant.generate(qm, "The city", max_new_tokens=12, temperature=1.5, seed=1) == a
    others = {secquant.generate(qm, "The city", max_new_tokens=12, temperature=1.5, seed=s)["text"] for s in (2, 3, 4)}
    assert others - {a["text"]}
    with pytest.raises(secquant.SecquantError, match="--seed is for sampling"):
        secquant.generate(qm, "The city", seed=1)
    with pytest.raises(secquant.SecquantError, match="positions"):
        secquant.generate(qm, "The city", max_new_tokens=500)


def test_tied_lm_head_quantized_leaves_the_embedding_table(tmp_path):
    """GPT-2 ties lm_head to the token embeddings: quantizing lm_head must not write into the table."""
    from secquant.recipes import get_preset

    d = tiny_causal_lm("gpt2")
    recipe = get_preset("w4a16-rtn").model_copy(update={"name": "w4-keep-wte", "ignore": ["transformer.wte"]})
    qm = secquant.quantize(str(d), recipe, out=tmp_path / "a")
    table = load_file(str(d / "model.safetensors"))["transformer.wte.weight"]
    loaded = secquant.load(tmp_path / "a", allow_unsealed=True)
    for m in (qm.module, loaded.module):
        assert torch.equal(m.transformer.wte.weight, table)
        head = m.lm_head.dequantized_weight()
        assert head.shape == table.shape and not torch.equal(head, table)  # 4-bit codes of its own
        assert (head - table).abs().max() < 0.5 * table.abs().max()
    assert qm.manifest.model.rebuild["tie_word_embeddings"] is True


def _copy_without_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_directory_without_tokenizer_is_refused_unless_named(tmp_path, cli, assert_user_error):
    src = tiny_causal_lm("llama")
    d = _copy_without_tokenizer(src, tmp_path / "bare")
    with pytest.raises(ModelError, match="no tokenizer files.*tokenizer.json.*--tokenizer DIR"):
        load_model(str(d))
    assert_user_error(cli("quantize", d, "--preset", "w8a16", "--out", tmp_path / "x"), tmp_path / "x",
                      contains=("no tokenizer files", "--tokenizer"))
    r = cli("quantize", d, "--preset", "w8a16", "--out", tmp_path / "x", "--tokenizer", src)
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "x" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    r = cli("eval", tmp_path / "x", "--against", d)  # the float directory has no tokenizer: the artifact's is used
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["metric"] == "perplexity" and {"value", "float_value", "kl_divergence", "top1_agreement"} <= set(res)
    r = cli("generate", tmp_path / "x", "--prompt", "The city council", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] <= 5 and out["decoding"] == "greedy"
    assert_user_error(cli("generate", tmp_path / "x", "--prompt", "x", "--seed", "3"), contains=("--seed",))


def test_unsupported_causal_lm_family_is_refused(tmp_path):
    d = tmp_path / "falcon"
    shutil.copytree(tiny_causal_lm("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="model_type 'falcon' are not supported.*llama"):
        load_model(str(d))


def test_generate_refuses_non_lm(digits_artifact):
    qm = secquant.load(digits_artifact("w8a16"), allow_unsealed=True)
    with pytest.raises(secquant.SecquantError, match="does not generate"):
        secquant.generate(qm, "hello")


# -- Hugging Face loading through transformers (every HF kind) ------------------------------------------------

def test_bert_with_task_head_saved_by_transformers_loads_as_encoder(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    tok = AutoTokenizer.from_pretrained(str(tiny_causal_lm("qwen2")))
    torch.manual_seed(0)
    m = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64))
    d = tmp_path / "bert"
    m.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    h = load_model(str(d))
    assert h.kind == "encoder"
    base = BertModel.from_pretrained(str(d), add_pooling_layer=False).eval()
    for k, v in base.state_dict().items():  # the checkpoint's `bert.` keys, converted by transformers
        assert torch.equal(h.module.transformer.state_dict()[k], v), k
    qm = secquant.quantize(h, "w8a16")
    assert qm.encode(["a short text"]).shape == (1, 32)


def test_vit_saved_by_transformers_loads_its_weights(tmp_path):
    """transformers renames ViT's keys when it loads (the old loader refused them as missing)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    from secquant.models.encoder import load_encoder_weights

    torch.manual_seed(0)
    m = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, image_size=32, patch_size=8))
    d = tmp_path / "vit"
    m.save_pretrained(d, safe_serialization=True)
    enc = load_encoder_weights(d, "cls", False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = enc.transformer(pixel_values=x).last_hidden_state
        theirs = m.vit(pixel_values=x).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ModelError, match="image model.*factory"):  # not run as a text encoder of [UNK]s
        load_model(str(d))
    assert isinstance(enc.transformer, ViTModel)


def test_gptq_runs_decoder_layer_by_decoder_layer(monkeypatch):
    """GPTQ on a causal LM runs each decoder layer on cached inputs (the embeddings run once per calibration
    pass, not once per GPTQ stage), with exactly the codes of the stage-by-stage pass over the whole model."""
    import secquant.quant.algorithms.gptq as gptq_mod

    h = load_model(str(tiny_causal_lm("qwen2")))
    calls = {"embed": 0, "blocks": 0}
    emb = h.module.get_input_embeddings()
    emb.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1))  # deep copies keep it
    seen_chain = []
    real = gptq_mod.chained_blocks
    monkeypatch.setattr(gptq_mod, "chained_blocks", lambda *a: seen_chain.append(real(*a)) or seen_chain[-1])
    by_block = secquant.quantize(h, "w4a16-gptq")
    block_embeds = calls["embed"]
    assert seen_chain[0][0] == "model.layers"
    monkeypatch.setattr(gptq_mod, "chained_blocks", lambda *a: None)
    calls["embed"] = 0
    whole = secquant.quantize(h, "w4a16-gptq")
    a, b = by_block.module.state_dict(), whole.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 2 decoder layers of 4 stages each + lm_head: the whole-model pass runs the embeddings ~9 times per batch
    assert block_embeds < 0.5 * calls["embed"]


@pytest.mark.parametrize("style,preset", [("gpt2", "w4a16-gptq"), ("qwen2", "w3a16-gptq")])
def test_greedy_generation_is_the_argmax_of_the_quantized_model(artifacts, style, preset):
    """transformers' generate (with its KV cache) on the quantized module picks, token after token, the argmax of
    the quantized model's own next-token logits recomputed from scratch."""
    qm = secquant.load(artifacts(style, preset), allow_unsealed=True)
    out = secquant.generate(qm, "The city council", max_new_tokens=6)
    tok = qm.handle.adapter.tokenizer
    ids = tok("The city council", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(out["generated_tokens"]):
            logits = qm.handle.run(qm.module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tok.decode(ids[0, out["prompt_tokens"]:], skip_special_tokens=True) == out["text"]


@pytest.mark.parametrize("style,preset", [("llama", "w4a16"), ("gpt2", "w8a8-dynamic"), ("qwen2", "w3a16-gptq")])
def test_secquant_export_writes_the_decoder_and_eval_runs_it_on_onnx_runtime(artifacts, style, preset, tmp_path, cli):
    """`secquant export` on a causal-lm artifact builds the decoder graph (input_ids, attention_mask -> logits;
    integer kernels), and `eval --runtime onnx` scores perplexity with it, close to the PyTorch model's."""
    import shutil

    import onnx

    art = shutil.copytree(artifacts(style, preset), tmp_path / "art")
    r = cli("export", art)
    assert r.exit_code == 0, r.stderr
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["logits"]
    ops = {n.op_type for n in m.graph.node}
    assert ("MatMulNBits" in ops) if preset != "w8a8-dynamic" else ("MatMulIntegerToFloat" in ops), ops
    qm = secquant.load(art, allow_unsealed=True)
    assert "model.onnx" in qm.manifest.files  # registered, so sealing carries and signs it
    on_ort = secquant.evaluate(qm, against=str(tiny_causal_lm(style)), runtime="onnx")
    on_torch = secquant.evaluate(qm, against=str(tiny_causal_lm(style)))
    assert on_ort["metric"] == "perplexity" and on_ort["runtime"].startswith("onnxruntime")
    assert abs(on_ort["value"] / on_torch["value"] - 1) < 0.01, (on_ort["value"], on_torch["value"])
