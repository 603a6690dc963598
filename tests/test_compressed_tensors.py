"""compressed-tensors export: the package's own schema parses what we write, transformers (with the package)
loads it and computes what our own quantized model computes, pruned zeros survive, bad input is refused.

Our own quantized model is the exported model object itself (export_compressed_tensors leaves the dequantized
weights in it) with, for w8a8, its inputs rounded per token (quantize_activations_per_token). Measured on a
tiny Llama (hidden 64, 2 blocks) trained for a few steps on a fixed text, on CPU: transformers' logits equal
ours exactly (relative L2 error 0.0, float32 and bfloat16, all three schemes) and so do the perplexities; the
bounds below (1e-5 relative on logits, 0.5% on perplexity) leave room for another BLAS's summation order only.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, OPTConfig

from tests.conftest import tiny_llama
from trainer.data.tokenizer import build_wordlevel_tokenizer
from trainer.errors import ConfigError
from trainer.quant.compressed_tensors import (
    SCHEMES,
    export_compressed_tensors,
    quantize_activations_per_token,
    round_to_nearest,
)
from trainer.quant.gptq import gptq_quantize

LOGITS_BOUND = 1e-5  # relative L2 error of transformers' logits against ours (measured: 0.0)
PPL_BOUND = 0.005  # relative perplexity difference (measured: 0.0)
TEXT = (
    "the quick brown fox jumps over the lazy dog while the small cat sleeps on the warm mat and "
    "the old man reads a long book by the window as the rain falls on the quiet town "
) * 4
FORMATS = {"w8a16": "pack-quantized", "w8a8": "int-quantized", "w4a16": "pack-quantized"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_wordlevel_tokenizer([TEXT])


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> torch.Tensor:
    """The fixed text as 4 windows of 32 tokens."""
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    return ids[: 4 * 32].view(4, 32)


@pytest.fixture(scope="module")
def trained(tokenizer, text_ids) -> torch.nn.Module:
    """A tiny Llama trained 8 steps on the fixed text: perplexity 1.76 there, which quantizing
    moves it (w8a16 +0.02%, w8a8 +0.06%, w4a16 +3%)."""
    model = tiny_llama(len(tokenizer)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        loss = model(input_ids=text_ids, labels=text_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def calibration_batches(vocab_size: int) -> list[torch.Tensor]:
    return [torch.randint(3, vocab_size, (4, 32), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]


def export(model, tokenizer, out, scheme, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # w4a16's smaller group on this tiny model is checked on its own
        return export_compressed_tensors(
            model, tokenizer, out, scheme=scheme, calibration=calibration_batches(len(tokenizer)), **kwargs
        )


@pytest.fixture(scope="module")
def exported(trained, tokenizer, tmp_path_factory):
    """Per scheme: (our quantized model, the export directory)."""
    root = tmp_path_factory.mktemp("ct")
    result = {}
    for scheme in SCHEMES:
        ours = copy.deepcopy(trained)
        out = export(ours, tokenizer, root / scheme, scheme)
        if scheme == "w8a8":
            quantize_activations_per_token(ours)
        result[scheme] = ours, out
    return result


def load_dequantized(out) -> torch.nn.Module:
    """The export as plain float linears holding the dequantized weights (CompressedTensorsConfig(dequantize=True))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the quantization_config from the model will be used": what we want
        return AutoModelForCausalLM.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True)
        )


def quantization_config(out) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_packages_own_schema_parses_the_quantization_config_and_names_the_stored_tensors(
    scheme, exported
):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, out = exported[scheme]
    qc = quantization_config(out)
    assert qc["quant_method"] == "compressed-tensors"
    parsed = QuantizationConfig.model_validate(qc)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    assert compressor.quantization_config == parsed
    assert parsed.format == FORMATS[scheme] and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"] and not qc.get("sparsity_config")
    [group] = parsed.config_groups.values()
    assert group.targets == ["Linear"]
    w = group.weights
    assert (w.num_bits, w.type, w.symmetric, w.dynamic) == (4 if scheme == "w4a16" else 8, "int", True, False)
    # w4a16's group of 128 is lowered to 64, the hidden width of this tiny model.
    assert (w.strategy, w.group_size) == (("group", 64) if scheme == "w4a16" else ("channel", None))
    a = group.input_activations
    if scheme == "w8a8":
        assert (a.num_bits, a.type, a.strategy, a.symmetric, a.dynamic) == (8, "int", "token", True, True)
    else:
        assert a is None

    state = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj."
    names = {k.removeprefix(q) for k in state if k.startswith(q)}
    assert names == (
        {"weight", "weight_scale"} if scheme == "w8a8" else {"weight_packed", "weight_scale", "weight_shape"}
    )
    assert state["model.embed_tokens.weight"].dtype == torch.float32  # embeddings stay float
    assert "lm_head.weight" not in state  # tied to the embedding, stored once
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_the_export_and_computes_our_quantized_models_logits(scheme, exported, text_ids):
    ours, out = exported[scheme]
    with torch.no_grad():
        want = ours(input_ids=text_ids).logits
        # The default: the layers load compressed and decompress on the first forward (on CPU too), w8a8's
        # activations are rounded per token on every call.
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        got = reloaded(input_ids=text_ids).logits
        assert relative_error(got, want) < LOGITS_BOUND
        # dequantize=True: plain float linears with the dequantized weights (w8a8 loses its activation rounding).
        dense = load_dequantized(out)
        for name, module in ours.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert torch.equal(dense.get_submodule(name).weight, module.weight), name
    assert dense.lm_head.weight is dense.model.embed_tokens.weight


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_reloaded_exports_perplexity_is_within_half_a_percent_of_our_quantized_models(
    scheme, exported, trained, text_ids
):
    ours, out = exported[scheme]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ppl_ours, ppl_reloaded = perplexity(ours, text_ids), perplexity(reloaded, text_ids)
    assert abs(ppl_reloaded / ppl_ours - 1) < PPL_BOUND
    assert perplexity(trained, text_ids) != ppl_ours  # the weights were quantized


def test_a_bfloat16_model_exports_bfloat16_scales_and_reloads_to_the_same_logits(
    tokenizer, text_ids, tmp_path
):
    for scheme in SCHEMES:
        ours = tiny_llama(len(tokenizer), dtype=torch.bfloat16)
        if scheme == "w8a16":  # without calibration: rounded to nearest
            out = export_compressed_tensors(ours, tokenizer, tmp_path / scheme, scheme=scheme)
        else:
            out = export(ours, tokenizer, tmp_path / scheme, scheme)
        if scheme == "w8a8":
            quantize_activations_per_token(ours)
        assert (
            load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight_scale"].dtype
            == torch.bfloat16
        )
        with torch.no_grad():
            reloaded = AutoModelForCausalLM.from_pretrained(out)
            assert reloaded.dtype == torch.bfloat16
            err = relative_error(reloaded(input_ids=text_ids).logits, ours(input_ids=text_ids).logits)
        assert err < LOGITS_BOUND, (scheme, err)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_pruned_model_keeps_its_zeros_through_export_and_reload(scheme, trained, tokenizer, tmp_path):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight
                w.scatter_(
                    1, w.abs().argsort(dim=1)[:, : w.shape[1] // 2], 0.0
                )  # the smaller half of each row
    pruned = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = export(model, tokenizer, tmp_path / scheme, scheme)  # GPTQ for all three: zeros must survive it
    assert not quantization_config(out).get("sparsity_config")  # dense: no sparsity metadata
    dense = load_dequantized(out)
    for name, before in pruned.items():
        if name == "lm_head":
            continue
        after = dense.get_submodule(name).weight
        assert torch.all(after[before == 0] == 0), name  # every pruned weight is still zero
        assert (after == 0).float().mean() >= 0.5, name


def test_gptq_in_groups_with_an_identity_hessian_rounds_each_group_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    q, scale = gptq_quantize(weight, torch.eye(64), qmax=7, group_size=16, damp=0.0)
    want_q, want_scale = round_to_nearest(weight, qmax=7, group_size=16)
    assert scale.shape == (24, 4)
    torch.testing.assert_close(scale, want_scale)
    assert torch.equal(q, want_q)


def test_gptq_keeps_zero_weights_at_zero_and_still_beats_rounding_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated input channels
    weight = torch.randn(24, 64)
    weight[torch.rand(24, 64) < 0.5] = 0.0
    q, scale = gptq_quantize(weight, x.t() @ x, qmax=7, group_size=32, keep_zeros=True)
    assert torch.all(q[weight == 0] == 0)
    nearest, s = round_to_nearest(weight, qmax=7, group_size=32)

    def error(q, s):
        deq = (q.float().view(24, 2, 32) * s[..., None]).view(24, 64)
        return (x @ (deq - weight).t()).norm()

    assert error(q, scale) < 0.9 * error(nearest, s)


def test_w4a16_lowers_the_group_size_to_divide_a_tiny_models_widths_and_says_so(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    with pytest.warns(
        UserWarning, match="group_size=128 does not divide the input widths \\[64, 128\\]; using 64"
    ):
        export_compressed_tensors(
            model, None, tmp_path / "out", scheme="w4a16", calibration=calibration_batches(len(tokenizer))
        )


def test_an_unknown_scheme_is_refused_naming_the_schemes_and_writes_nothing(tokenizer, tmp_path):
    with pytest.raises(
        ConfigError, match="scheme=int8_smooth: compressed-tensors export takes w8a16, w8a8, w4a16"
    ):
        export_compressed_tensors(
            tiny_llama(len(tokenizer)), tokenizer, tmp_path / "out", scheme="int8_smooth"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_gptq_schemes_without_calibration_are_refused_naming_w8a16(scheme, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="needs calibration batches.*scheme=w8a16"):
        export_compressed_tensors(tiny_llama(len(tokenizer)), tokenizer, tmp_path / "out", scheme=scheme)


def test_w8a8_on_a_model_without_rmsnorm_blocks_is_refused_naming_the_weight_only_schemes(tmp_path):
    config = OPTConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
    )
    model = AutoModelForCausalLM.from_config(
        config
    ).eval()  # LayerNorm, not RMSNorm: nowhere to fold the scales
    with pytest.raises(ConfigError, match="OPTForCausalLM does not have; use scheme=w8a16 or w4a16"):
        export_compressed_tensors(
            model, None, tmp_path / "out", scheme="w8a8", calibration=calibration_batches(128)
        )
    assert not (tmp_path / "out").exists()


def test_an_int8_smooth_model_is_refused_naming_w8a8_on_the_float_model(tokenizer, tmp_path):
    from trainer.quant import quantize_model

    model = tiny_llama(len(tokenizer))
    quantize_model(model, "int8_smooth", keep_float=[], calibration=calibration_batches(len(tokenizer)))
    with pytest.raises(ConfigError, match="int8_smooth layer.*no compressed-tensors equivalent.*scheme=w8a8"):
        export_compressed_tensors(model, tokenizer, tmp_path / "out", scheme="w8a8", calibration=[])


def test_a_torchao_quantized_model_is_refused_naming_the_float_export(tokenizer, tmp_path):
    from trainer.quant import quantize_model  # torchao: in the dev extra

    model = tiny_llama(len(tokenizer))
    quantize_model(model, "int8_weight", keep_float=["lm_head"])
    with pytest.raises(ConfigError, match="not a float tensor: the model is already quantized.*hf/ export"):
        export_compressed_tensors(model, tokenizer, tmp_path / "out", scheme="w8a16")


def test_a_model_loaded_from_a_compressed_tensors_export_is_refused(exported, tokenizer, tmp_path):
    _, out = exported["w8a16"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ConfigError, match="loaded quantized \\(quantization_config: compressed-tensors\\)"):
        export_compressed_tensors(reloaded, tokenizer, tmp_path / "again", scheme="w8a16")


def test_a_failed_export_leaves_the_previous_output_and_no_temporary_directory(
    tokenizer, tmp_path, monkeypatch
):
    import safetensors.torch

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("kept")

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(OSError, match="disk full"):
            export_compressed_tensors(tiny_llama(len(tokenizer)), tokenizer, target, scheme="w8a16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "previous").read_text() == "kept"
