"""trainer.export's formats: GGUF read back by transformers' own GGUF loader (the format is llama.cpp's, so
its reader is the test), the inputs a model_path may name, the refusals, and the compressed-tensors dispatch.

The model is a tiny Llama (hidden 32, 2 layers) trained 6 steps on pydoc text with a 300-token byte-level BPE
tokenizer whose ids stop short of the model's 320 embeddings (the padding ids GGUF names `[PADn]`).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import gguf  # in the dev extra: a missing package fails these tests rather than skipping them
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import composition_error
from trainer.errors import ConfigError
from trainer.train import CONF_DIR

# Largest |logit difference| of the GGUF model read back by transformers over the reference's largest |logit|,
# on 64 tokens of pydoc text. Measured on this model (2026-11-27, gguf 0.19, transformers 5.24, CPU): f16
# 1.9e-4, bf16 1.6e-3, q8_0 2.1e-3, q4_0 4.8e-2 (the LM head's matrix f16; q8_0 5.4e-3 with it quantized); the
# bounds leave 4-6x of margin. f32 is exact up to float32 summation order (measured 0.0), checked with atol 1e-5.
RELATIVE_BOUND = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": 0.2}


def export_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("export", overrides=list(overrides))


def run_export(*overrides: str) -> Path:
    from trainer.export import export

    return export(export_config(*overrides))


@pytest.fixture(scope="module")
def reference(bpe_run):
    """Our model (from hf/), our tokenizer, and 64 tokens of pydoc text with the model's logits on them."""
    import pydoc_data.topics

    from transformers import AutoModelForCausalLM

    from trainer.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(bpe_run / "hf", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(bpe_run / "hf"))
    text = pydoc_data.topics.topics["assignment"]
    ids = torch.tensor([tokenizer(text).input_ids[:64]])
    with torch.no_grad():
        logits = model(ids).logits
    return model, tokenizer, ids, logits


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_transformers_gguf_loader_reads_each_type_with_logits_within_its_measured_bound(
    bpe_run, reference, tmp_path, gguf_type
):
    _, _, ids, expected = reference
    out = run_export(
        f"model_path={bpe_run}", "format=gguf", f"gguf.type={gguf_type}", f"output_dir={tmp_path / 'g'}"
    )
    [path] = list(out.iterdir())
    assert path.name == f"model-{gguf_type}.gguf"
    model, _ = load_gguf(path)
    with torch.no_grad():
        got = model(ids).logits
    if gguf_type == "f32":
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        print(f"{gguf_type}: max |logit error| / max |logit| = {error:.2e}, {path.stat().st_size} bytes")
        assert error < RELATIVE_BOUND[gguf_type]
    assert leftovers(tmp_path) == []


def test_gguf_holds_llamas_names_types_and_metadata_and_no_output_when_tied(bpe_run, reference, tmp_path):
    model = reference[0]
    out = run_export(
        f"model_path={bpe_run / 'hf'}", "format=gguf", "gguf.type=q4_0", f"output_dir={tmp_path}/g"
    )
    reader = gguf.GGUFReader(out / "model-q4_0.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in kinds  # tied: llama.cpp uses token_embd
    # The LM head's matrix (tied: the embedding) stays float, as trainer.quantize keeps it.
    assert kinds["token_embd.weight"] == "F16"
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == "Q4_0"
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    assert len(kinds) == 2 + 9 * model.config.num_hidden_layers

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 32
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size == 320 and tokens[-1] == "[PAD319]"


def test_gguf_tokenizer_gives_our_ids_on_pydoc_text(bpe_run, reference, tmp_path):
    import pydoc_data.topics

    _, ours, _, _ = reference
    out = run_export(f"model_path={bpe_run}", "format=gguf", "gguf.type=f32", f"output_dir={tmp_path / 'g'}")
    _, theirs = load_gguf(out / "model-f32.gguf")
    texts = list(pydoc_data.topics.topics.values())
    assert [theirs(t).input_ids for t in texts] == [ours(t).input_ids for t in texts]
    assert theirs.eos_token == ours.eos_token and theirs.pad_token == ours.pad_token


def test_a_gguf_model_and_its_tokenizer_load_from_one_parse_of_the_file(
    bpe_run, reference, tmp_path, monkeypatch
):
    """transformers parses the file for the config, the weights and the tokenizer; our loaders (evaluate,
    quantize, generate; a training run's pretrained model shares the config's and the weights') parse it once,
    and load what transformers alone loads: the model's logits and the tokenizer's ids."""
    import gguf

    from trainer.quant.serialization import load_float

    _, ours, ids, logits = reference
    out = run_export(f"model_path={bpe_run}", "format=gguf", "gguf.type=f32", f"output_dir={tmp_path / 'g'}")
    path = out / "model-f32.gguf"
    parses, parse = [], gguf.GGUFReader
    monkeypatch.setattr(
        gguf, "GGUFReader", lambda *args, **kwargs: parses.append(args) or parse(*args, **kwargs)
    )
    loaded, tokenizer = load_float(str(path.parent), path.name)
    assert len(parses) == 1
    assert gguf.GGUFReader is not parse  # ours again after the load (the test's counter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, atol=1e-5, rtol=0)
    text = "def f(x):\n    return x"
    assert tokenizer(text).input_ids == ours(text).input_ids


def test_gguf_rotary_rows_are_llama_cpps_permutation_and_transformers_inverts_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from trainer.gguf_export import permute_rotary_rows

    weight = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    permuted = permute_rotary_rows(weight, 2)
    # per head, the rotate-half pairs (i, i + 4) become neighbours (2i, 2i + 1)
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 2, 2)
    assert (torch.from_numpy(back) == weight).all()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # with head size 16: wavelengths 6.3 (kept), 20 and 63 (interpolated), 199 and over (divided by 8)
    "original_max_position_embeddings": 64,
}


def llama3_model(reference, rope: dict | None = None):
    from transformers import AutoModelForCausalLM

    config = reference[0].config.to_dict() | {"rope_parameters": rope or LLAMA3_ROPE}
    config = type(reference[0].config).from_dict(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(reference, tmp_path):
    """transformers' own Llama 3 frequencies are the default ones divided by the factors the file holds."""
    from trainer.gguf_export import export_gguf

    model = llama3_model(reference)
    path = export_gguf(model, reference[1], tmp_path, gguf_type="f32")
    [factors] = [t.data for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    default = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled = model.model.rotary_emb.inv_freq.double()
    want = default / scaled
    assert want[0] == 1.0 and want[-1] == pytest.approx(8.0) and 1 < want[1] < 8  # all three regions
    torch.testing.assert_close(torch.from_numpy(factors.copy()).double(), want, rtol=1e-6, atol=0)
    # a scaling GGUF has no form for is refused before anything is written
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(
        ConfigError, match="rope_type=yarn: only the default rope, linear scaling and Llama 3's"
    ):
        export_gguf(llama3_model(reference, yarn), reference[1], tmp_path / "yarn", gguf_type="f32")
    assert not (tmp_path / "yarn").exists()


def test_tensor_types_follow_llama_cpp_norms_f32_short_rows_f16_and_a_q8_0_output_under_q4_0():
    from trainer.gguf_export import tensor_type

    assert tensor_type("blk.0.attn_norm.weight", (32,), "q4_0") == "f32"
    assert tensor_type("blk.0.attn_q.weight", (32, 32), "q4_0") == "q4_0"
    assert tensor_type("blk.0.ffn_down.weight", (32, 48), "q8_0") == "f16"  # 48 is not a multiple of 32
    assert tensor_type("token_embd.weight", (320, 32), "q4_0", is_output=True) == "q8_0"
    assert tensor_type("token_embd.weight", (320, 32), "bf16", is_output=True) == "bf16"
    assert tensor_type("blk.0.ffn_down.weight", (32, 48), "bf16") == "bf16"
    # kept float: f16 under the quantized types, the file's own type otherwise
    for gguf_type, kept in [("q8_0", "f16"), ("q4_0", "f16"), ("f32", "f32"), ("bf16", "bf16")]:
        assert tensor_type("token_embd.weight", (320, 32), gguf_type, is_output=True, keep_float=True) == kept
        assert tensor_type("blk.0.ffn_down.weight", (32, 64), gguf_type, keep_float=True) == kept


@pytest.mark.parametrize(
    "keep_float,kept",
    [
        (None, {"token_embd.weight"}),  # the default: the LM head, tied to the embedding here
        ("[]", set()),  # nothing: the output matrix q8_0 under q4_0, as llama-quantize keeps it at more bits
        ("[down_proj]", {f"blk.{i}.ffn_down.weight" for i in range(2)}),
    ],
)
def test_gguf_keep_float_leaves_the_named_matrices_f16_and_by_default_the_lm_head(
    bpe_run, tmp_path, keep_float, kept
):
    extra = [] if keep_float is None else [f"gguf.keep_float={keep_float}"]
    out = run_export(
        f"model_path={bpe_run}", "format=gguf", "gguf.type=q4_0", f"output_dir={tmp_path}/g", *extra
    )
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model-q4_0.gguf").tensors}
    matrices = {name for name, kind in kinds.items() if kind != "F32"}
    assert {name for name in matrices if kinds[name] == "F16"} == kept
    if "token_embd.weight" not in kept:
        assert kinds["token_embd.weight"] == "Q8_0"
    assert all(kinds[name] == "Q4_0" for name in matrices - kept - {"token_embd.weight"})


# The families written beside llama, as tiny configs (hidden 32, 2 layers, the run's 320-id vocabulary) with what
# each needs on top: phi3's default pad id (32000) is beyond this vocabulary; gemma2's window of 16 tokens binds
# on its even layers within the 64 tokens compared; qwen3 keeps its default head size (128) and gpt2 its 1024
# positions, the values transformers' GGUF loader assumes (it reads neither from the file).
TINY_FAMILY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=320,
    max_position_embeddings=128,
)
FAMILY_CONFIGS = {
    "mistral": TINY_FAMILY,
    "qwen2": TINY_FAMILY,
    "qwen3": TINY_FAMILY,
    "gemma2": TINY_FAMILY | {"sliding_window": 16},
    "phi3": TINY_FAMILY | {"pad_token_id": 0},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=320, bos_token_id=0, eos_token_id=0),
}


def family_model(model_type: str, **changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **FAMILY_CONFIGS.get(model_type, TINY_FAMILY) | changes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def pydoc_batches(reference):
    """Batches of 4 x 65 tokens of pydoc text, for training the family models a little."""
    import pydoc_data.topics

    ids = reference[1](" ".join(list(pydoc_data.topics.topics.values())[:40])).input_ids
    return torch.tensor(ids[: len(ids) // 65 * 65]).view(-1, 65).split(4)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on the shared CPU (50x on a busy one)
    yield
    torch.set_num_threads(threads)


def trained_family_model(model_type: str, batches):
    """A tiny model of the family trained 30 steps, as the Llama of the bounds above is trained (a random model's
    logits are near zero, which inflates the relative error), its norms and biases moved off their init first so
    that Gemma's norm offset and Qwen2's biases count."""
    model = family_model(model_type)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(30):
        batch = batches[step % len(batches)]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("model_type", FAMILY_CONFIGS)
def test_each_family_reads_back_through_transformers_gguf_loader_within_the_llama_bounds(
    model_type, reference, pydoc_batches, tmp_path, one_thread
):
    """Measured (2026-12-07, gguf 0.19, transformers 5.25, CPU): f32 0.0 for every family; q8_0 3.2e-4 (gpt2) to
    3.8e-3 (mistral) of the largest logit."""
    import pydoc_data.topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.tokenizer import load_tokenizer

    model = trained_family_model(model_type, pydoc_batches)
    model.save_pretrained(tmp_path / "hf")
    reference[1].save_pretrained(str(tmp_path / "hf"))
    if (
        model_type == "qwen2"
    ):  # a Qwen2 tokenizer of the same vocabulary (NFC, digits one by one), as Qwen's are
        qwen = AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert type(qwen).__name__ == "Qwen2Tokenizer"
        qwen.save_pretrained(str(tmp_path / "hf"))
    ids = reference[2]
    with torch.no_grad():
        expected = model(ids).logits
    for gguf_type in ["f32", "q8_0"]:
        out = run_export(
            f"model_path={tmp_path / 'hf'}",
            "format=gguf",
            f"gguf.type={gguf_type}",
            f"output_dir={tmp_path / gguf_type}",
        )
        path = out / f"model-{gguf_type}.gguf"
        loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        # llama.cpp writes Mistral as its llama architecture, which transformers reads as a Llama
        assert loaded.config.model_type == {"mistral": "llama"}.get(model_type, model_type)
        with torch.no_grad():
            got = loaded(ids).logits
        if gguf_type == "f32":
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        else:
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            print(f"{model_type} {gguf_type}: max |logit error| / max |logit| = {error:.2e}")
            assert error < RELATIVE_BOUND[gguf_type]
    # The tokenizer the export read from hf/ (for qwen2 Qwen2's), as transformers rebuilds it from the file.
    ours = load_tokenizer(str(tmp_path / "hf"))
    split = gguf.GGUFReader(tmp_path / "f32" / "model-f32.gguf").fields["tokenizer.ggml.pre"].contents()
    assert split == ("qwen2" if model_type == "qwen2" else "gpt-2")
    _, theirs = load_gguf(tmp_path / "f32" / "model-f32.gguf")
    texts = [pydoc_data.topics.topics[k] for k in ("numbers", "integers", "assignment")]
    assert [theirs(t).input_ids for t in texts] == [ours(t).input_ids for t in texts]


def test_what_a_familys_gguf_cannot_describe_is_refused_naming_it_and_writes_nothing(reference, tmp_path):
    from trainer.gguf_export import FAMILIES, export_gguf

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 64}
    written = ", ".join(f"{t} ({f.model_class})" for t, f in FAMILIES.items())
    cases = [
        (
            family_model("gpt_neox"),
            f"it is GPTNeoXForCausalLM \\(model_type=gpt_neox\\), and the families written are {re.escape(written)}",
        ),
        (
            family_model("mistral", sliding_window=16),
            r"sliding window of 16 tokens on layers \[0, 1\], within its context of 128; llama.cpp's llama slides nowhere",
        ),
        (
            family_model("gemma2", layer_types=["sliding_attention"] * 2),
            r"llama.cpp's gemma2 slides on the even layers only",
        ),
        (
            family_model("qwen2", rope_parameters=yarn),
            r"rope_type=yarn: only the default rope and linear scaling are written to GGUF for qwen2",
        ),
        (
            family_model("qwen3", attention_bias=True),
            r"has biases \(model.layers.0.self_attn.q_proj.bias, ...\); llama.cpp's qwen3 reads none",
        ),
        (
            family_model("gemma2", query_pre_attn_scalar=16),
            r"1/sqrt\(query_pre_attn_scalar=16\); llama.cpp scales them by 1/sqrt\(head size 256\)",
        ),
        (
            family_model("gpt2", scale_attn_by_inverse_layer_idx=True),
            r"has \{'scale_attn_by_inverse_layer_idx': True\}; llama.cpp's gpt2 computes",
        ),
        (family_model("phi3", hidden_act="gelu"), r"activation gelu; llama.cpp's phi3 computes silu"),
    ]
    for model, reason in cases:
        with pytest.raises(ConfigError, match=reason):
            export_gguf(model, reference[1], tmp_path / "out", gguf_type="f32")
        assert not (tmp_path / "out").exists()
    # written for llama.cpp, but not what transformers' loader would rebuild: said, not refused
    with pytest.warns(
        UserWarning, match="head_dim=16 is written for llama.cpp, but transformers' GGUF loader"
    ):
        export_gguf(family_model("qwen3", head_dim=16), reference[1], tmp_path / "out", gguf_type="f32")


def test_a_model_path_may_be_a_run_a_checkpoint_or_an_hf_export(bpe_run, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, ids, expected = reference
    step = bpe_run / "checkpoints" / "step_00000006"
    for name, source in [("run", bpe_run), ("step", step), ("hf", bpe_run / "hf")]:
        out = run_export(f"model_path={source}", f"output_dir={tmp_path / name}")  # format=hf by default
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_the_positional_form_still_exports_a_checkpoint_to_hf(bpe_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from trainer.export import is_hydra_form, main

    step = bpe_run / "checkpoints" / "step_00000006"
    assert not is_hydra_form([str(step), str(tmp_path / "out"), "--run-dir", str(bpe_run)])
    assert is_hydra_form([f"model_path={step}", "output_dir=o"])
    main([str(step), str(tmp_path / "out")])
    assert f"exported {step} to {tmp_path / 'out'}" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize(
    "override,allowed", [("format=onnx", "hf, gguf, compressed_tensors"), ("gguf.type=q2_k", "f32, f16")]
)
def test_an_unknown_format_or_gguf_type_is_refused_at_composition(override, allowed):
    message = composition_error("model_path=m", "output_dir=o", override, config="export")
    assert override.split("=")[0] in message and allowed in message


def test_bad_exports_are_refused_with_the_reason_and_leave_no_file(bpe_run, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from trainer.data.tokenizer import build_wordlevel_tokenizer, load_tokenizer

    # A family GGUF is not written for: a tiny GPT-NeoX beside the run's BPE tokenizer.
    neox = tmp_path / "neox"
    config = GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=320
    )
    GPTNeoXForCausalLM(config).save_pretrained(neox)
    load_tokenizer(str(bpe_run / "hf")).save_pretrained(str(neox))
    # A Llama with data=embedded's word-level tokenizer.
    words = tmp_path / "words"
    shutil.copytree(bpe_run / "hf", words)
    for f in words.glob("tokenizer*"):
        f.unlink()
    build_wordlevel_tokenizer(["a b c"]).save_pretrained(str(words))
    # A non-empty output directory.
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")

    nested = tmp_path / "nested" / "out"
    cases = [
        ([f"model_path={neox}", "format=gguf", f"output_dir={nested}"], "it is GPTNeoXForCausalLM"),
        (
            [f"model_path={bpe_run}", "format=gguf", "gguf.keep_float=[lm_haed]", f"output_dir={nested}"],
            r"keep_float=\['lm_haed'\]: no matrix",
        ),
        ([f"model_path={words}", "format=gguf", f"output_dir={nested}"], "word-level"),
        ([f"model_path={bpe_run}", "format=gguf", f"output_dir={full}"], "not empty"),
        ([f"model_path={bpe_run}", "scheme=w8a8", f"output_dir={nested}"], "format=compressed_tensors only"),
        ([f"model_path={bpe_run}", "format=compressed_tensors", f"output_dir={nested}"], "needs a scheme"),
        ([f"model_path={bpe_run}", f"output_dir={bpe_run}", "overwrite=true"], "holds the model"),
    ]
    for overrides, reason in cases:
        with pytest.raises(ConfigError, match=reason):
            run_export(*overrides)
        assert not (tmp_path / "nested").exists(), overrides  # not even the parent made for it
    assert (full / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []
    assert sorted(p.name for p in bpe_run.iterdir()) == sorted(
        ["checkpoints", "data", "hf", "metrics.jsonl", "resolved_config.yaml", "tokenizer"]
    )

    # overwrite=true replaces the directory as a whole
    run_export(f"model_path={bpe_run}", "format=gguf", f"output_dir={full}", "overwrite=true")
    assert sorted(p.name for p in full.iterdir()) == ["model-f16.gguf"]


def test_compressed_tensors_export_of_a_run_loads_in_transformers_close_to_the_float_model(bpe_run, tmp_path):
    from transformers import AutoModelForCausalLM

    data = ["data=pydoc", "data.tokenizer_vocab_size=300", "data.seq_len=32"]
    out = run_export(
        f"model_path={bpe_run}",
        "format=compressed_tensors",
        "scheme=w8a8",
        *data,
        "calibration.batches=2",
        "calibration.batch_size=3",
        f"output_dir={tmp_path / 'ct'}",
    )
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True  # per-token int8
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(bpe_run / "hf").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 0.05  # int8 weights and activations: measured ~1e-2


# Run in the interpreter TRAINER_LLAMA_CPP_PYTHON names (default: this one): llama.cpp's own reading of a file,
# through llama-cpp-python, which compiles llama.cpp and is in no extra. Its KV cache in f32 (type 0), not
# llama.cpp's default f16, so that an f32 file's logits compare at float32 precision. Prints its tokenization of
# the text, its logits on the prompt ids and its greedy continuation of them.
LLAMA_CPP_SCRIPT = """
import json, sys
from llama_cpp import Llama

path, text, prompt, count = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=128, n_threads=1, logits_all=True, type_k=0, type_v=0, verbose=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=False)
llm.eval(prompt)
logits = llm.scores[: len(prompt)].tolist()
continuation = []
for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
    continuation.append(token)
    if len(continuation) == count:
        break
print("RESULT " + json.dumps({"ids": ids, "logits": logits, "continuation": continuation}))
"""


def llama_cpp_python() -> str:
    """The interpreter TRAINER_LLAMA_CPP_PYTHON names (default: this one), or a skip saying why there is none."""
    import os
    import subprocess

    python = os.environ.get("TRAINER_LLAMA_CPP_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(
            f"llama-cpp-python is not importable by {python}: it compiles llama.cpp when installed (22.5 min "
            "on 2 cores), so make test does not install it; `pip install llama-cpp-python` into a venv and set "
            "TRAINER_LLAMA_CPP_PYTHON to its python to run this check"
        )
    return python


def run_llama_cpp(python: str, path: Path, text: str, prompt: list[int], count: int = 16) -> dict:
    import subprocess

    args = [str(path), text, json.dumps(prompt), str(count)]
    proc = subprocess.run(
        [python, "-c", LLAMA_CPP_SCRIPT, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_llama_cpp_reads_every_gguf_type_tokenizes_computes_and_continues_greedily_like_us(
    bpe_run, reference, tmp_path
):
    """llama.cpp on the f32 file: our ids on pydoc text; our logits on 16 tokens (measured difference 1.2e-7,
    checked at 1e-5); the other types within the bounds of transformers' reading (measured: f16 3.1e-4, bf16
    2.3e-3, q8_0 6.4e-3, q4_0 4.9e-2: llama.cpp also rounds the activations to 8 bits for q8_0 and q4_0
    matrices); and, on a model with random N(0, 0.3) matrices (the 6-step model repeats one token, which
    would test little), our greedy continuation of 16 tokens through its KV cache (measured: identical), and
    with Llama 3's rope scaling our logits (measured difference 1.2e-05, against 5.0 without the scaling)."""
    import pydoc_data.topics

    from transformers import AutoModelForCausalLM

    from trainer.gguf_export import export_gguf

    python = llama_cpp_python()
    model, tokenizer, ids, _ = reference
    text = pydoc_data.topics.topics["for"]
    prompt = ids[:, :16]

    def llama_cpp(path: Path) -> dict:
        return run_llama_cpp(python, path, text, prompt[0].tolist())

    out = run_export(f"model_path={bpe_run}", "format=gguf", "gguf.type=f32", f"output_dir={tmp_path / 'g'}")
    theirs = llama_cpp(out / "model-f32.gguf")
    assert theirs["ids"] == tokenizer(text).input_ids
    with torch.no_grad():
        expected = model(prompt).logits[0]
    print(f"llama.cpp f32: max |logit error| = {(torch.tensor(theirs['logits']) - expected).abs().max():.1e}")
    torch.testing.assert_close(torch.tensor(theirs["logits"]), expected, atol=1e-5, rtol=0)

    for gguf_type, bound in RELATIVE_BOUND.items():  # the other types, within transformers' bounds
        out = run_export(
            f"model_path={bpe_run}",
            "format=gguf",
            f"gguf.type={gguf_type}",
            f"output_dir={tmp_path / gguf_type}",
        )
        got = torch.tensor(llama_cpp(out / f"model-{gguf_type}.gguf")["logits"])
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        print(f"llama.cpp {gguf_type}: max |logit error| / max |logit| = {error:.2e}")
        assert error < bound, gguf_type

    torch.manual_seed(0)
    scrambled = AutoModelForCausalLM.from_config(model.config).eval()
    with torch.no_grad():
        for p in scrambled.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
        ours = scrambled.generate(
            prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, 16:].tolist()
    theirs = llama_cpp(export_gguf(scrambled, tokenizer, tmp_path / "scrambled", gguf_type="f32"))
    assert len(set(ours)) > 4  # a continuation that depends on the attention, not one token repeated
    assert theirs["continuation"] == ours

    # Llama 3's rope scaling, as llama.cpp applies the file's frequency factors (the same random matrices)
    llama3 = llama3_model(reference)
    llama3.load_state_dict(scrambled.state_dict())
    with torch.no_grad():
        expected = llama3(prompt).logits[0]
        unscaled = (scrambled(prompt).logits[0] - expected).abs().max().item()
    theirs = torch.tensor(
        llama_cpp(export_gguf(llama3, tokenizer, tmp_path / "llama3", gguf_type="f32"))["logits"]
    )
    print(
        f"llama.cpp llama3 rope: max |logit error| = {(theirs - expected).abs().max():.1e} (unscaled: {unscaled:.1e})"
    )
    assert unscaled > 1e-2  # the scaling changes these positions' logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=0)


def test_llama_cpp_computes_each_familys_logits_like_us(reference, pydoc_batches, tmp_path, one_thread):
    """llama.cpp's own graph for each family's architecture (gemma2's norm offset, window and soft-capping, qwen2's
    biases, qwen3's Q/K norms, phi3's fused matrices) on the f32 file: our logits on 32 tokens, so that gemma2's
    16-token window binds. Not run where llama-cpp-python is not built (this machine); bound as the Llama's."""
    from trainer.gguf_export import export_gguf

    python = llama_cpp_python()
    prompt = reference[2][:, :32]
    for model_type in FAMILY_CONFIGS:
        model = trained_family_model(model_type, pydoc_batches)
        with torch.no_grad():
            expected = model(prompt).logits[0]
        path = export_gguf(model, reference[1], tmp_path / model_type, gguf_type="f32")
        got = torch.tensor(run_llama_cpp(python, path, "a", prompt[0].tolist(), count=1)["logits"])
        print(f"llama.cpp {model_type} f32: max |logit error| = {(got - expected).abs().max():.1e}")
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=model_type)


def test_an_export_stopped_by_sigterm_leaves_nothing_beside_its_output(tmp_path):
    """A scheduler's kill mid-export (seen: a `.NAME.*.partial` staging directory left behind)."""
    import signal
    import subprocess

    script = (
        "import sys, time\nfrom pathlib import Path\nfrom trainer.utils import staged\n"
        "with staged(Path(sys.argv[1])) as d:\n"
        "    (d / 'model.safetensors').write_bytes(b'0' * 1024)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
    )
    out = tmp_path / "exports" / "model"
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert len(list((tmp_path / "exports").iterdir())) == 1  # the staging directory
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # no staging directory, and not the parent made for it
