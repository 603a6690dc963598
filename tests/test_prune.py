"""Pruning: each method's mask against a hand-computed one, the GMP schedule, SparseGPT against magnitude on
correlated inputs, N:M counts, structured pruning against the dense model with the removed parts zeroed, bad
input, and masks that hold through fine-tuning under every strategy with 2 real CPU ranks."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, make_trainer, read_metrics, run_command, strip_model_description
from trainer.config import validate_config
from trainer.data.prepared import Batch
from trainer.errors import ConfigError
from trainer.prune.methods import magnitude_mask, nm_mask, sparsegpt_prune, wanda_mask
from trainer.prune.schedule import gmp_sparsity, is_update_step

# ---- masks against hand-computed ones ------------------------------------------------------------------


def test_magnitude_removes_the_smallest_weights_of_the_whole_layer():
    w = torch.tensor([[0.1, -2.0, 0.3, 4.0], [-0.2, 0.5, -3.0, 0.05]])
    # |w| sorted: 0.05, 0.1, 0.2, 0.3 | 0.5, 2, 3, 4 -> the first four go.
    want = torch.tensor([[False, True, False, True], [False, True, True, False]])
    assert torch.equal(magnitude_mask(w, 0.5), want)
    assert torch.equal(magnitude_mask(w, 0.0), torch.ones_like(want))


def test_wanda_weighs_magnitude_by_the_input_norm_per_output_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 0.01])  # ||x|| = 10, 1, 1, 0.1
    # Row 0 scores 10, 2, 3, 0.4 -> drop cols 1 and 3; row 1 scores 40, 3, 2, 0.1 -> drop cols 2 and 3.
    want = torch.tensor([[True, False, True, False], [True, True, False, False]])
    assert torch.equal(wanda_mask(w, sq_norm, 0.5), want)
    assert not torch.equal(magnitude_mask(w, 0.5), want)  # the activations changed the choice


def test_nm_keeps_the_n_largest_of_every_group_of_m():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    want = torch.tensor([[False, True, True, False, True, False, False, True]])
    assert torch.equal(nm_mask(scores, 2, 4), want)
    mask = nm_mask(torch.randn(16, 64), 2, 4)
    assert (mask.reshape(16, 16, 4).sum(-1) == 2).all()
    assert (nm_mask(torch.randn(8, 24), 1, 8).reshape(8, 3, 8).sum(-1) == 1).all()


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning_without_updates():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    # H = 3 I: every input independent with the same variance, so no remaining weight can compensate.
    new, keep = sparsegpt_prune(w, 3.0 * torch.eye(16), sparsity=0.5, damp=1e-8)
    assert torch.equal(keep, magnitude_mask(w, 0.5))
    torch.testing.assert_close(new, w * keep)


def test_sparsegpt_reconstructs_better_than_magnitude_on_correlated_inputs():
    torch.manual_seed(0)
    base = torch.randn(2048, 8)
    x = base @ torch.randn(8, 64) + 0.1 * torch.randn(2048, 64)  # 64 inputs driven by 8 factors
    w = torch.randn(32, 64)
    new, keep = sparsegpt_prune(w, x.T @ x, sparsity=0.5)
    assert int((~keep).sum()) == 32 * 32 and torch.equal(new == 0, ~keep)
    dense = x @ w.T
    err_sparsegpt = (dense - x @ new.T).pow(2).mean()
    err_magnitude = (dense - x @ (w * magnitude_mask(w, 0.5)).T).pow(2).mean()
    assert err_sparsegpt < 0.5 * err_magnitude, (err_sparsegpt, err_magnitude)
    new24, keep24 = sparsegpt_prune(w, x.T @ x, n=2, m=4)
    assert (keep24.reshape(32, 16, 4).sum(-1) == 2).all() and torch.equal(new24 == 0, ~keep24)


def test_gmp_follows_the_cubic_schedule_between_updates():
    kw = dict(initial=0.0, final=0.8, start_step=0, end_step=100, frequency=10)
    assert gmp_sparsity(0, **kw) == 0.0
    assert gmp_sparsity(10, **kw) == pytest.approx(0.8 * (1 - 0.9**3))  # 0.2168
    assert gmp_sparsity(50, **kw) == pytest.approx(0.7)  # 0.8 - 0.8 * 0.5^3
    assert gmp_sparsity(55, **kw) == pytest.approx(0.7)  # held until the next update
    assert gmp_sparsity(100, **kw) == gmp_sparsity(500, **kw) == 0.8
    late = dict(kw, initial=0.2, start_step=20)
    assert gmp_sparsity(19, **late) == 0.0 and gmp_sparsity(20, **late) == pytest.approx(0.2)
    assert [s for s in range(0, 120) if is_update_step(s, start_step=0, end_step=100, frequency=25)] == [
        0,
        25,
        50,
        75,
        100,
    ]


def test_wanda_calibrates_each_block_on_the_outputs_of_the_pruned_blocks_before_it():
    import copy

    from trainer.calibration import update_blocks_sequentially

    model = _tiny_llama(layers=2)
    dense = copy.deepcopy(model)
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(2)]
    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")]
    got = {}

    def prune_layer(name, module, stats):
        got[name] = wanda_mask(module.weight, stats.sq_norm, 0.5)
        module.weight.data.mul_(got[name])

    update_blocks_sequentially(
        model, batches, {n: model.get_submodule(n) for n in names}, prune_layer, with_hessian=False
    )

    def input_sq_norms(m):  # reference: forward hooks on a whole-model forward
        seen = {n: 0.0 for n in names}

        def hook(mod, inputs, out, n):
            seen[n] = seen[n] + inputs[0].reshape(-1, inputs[0].shape[-1]).pow(2).sum(0)

        handles = [
            m.get_submodule(n).register_forward_hook(lambda a, b, c, n=n: hook(a, b, c, n)) for n in names
        ]
        with torch.no_grad():
            for ids in batches:
                m(ids)
        for h in handles:
            h.remove()
        return seen

    norms = input_sq_norms(dense)  # block 0 sees the dense inputs
    for n in names[:2]:
        assert torch.equal(got[n], wanda_mask(dense.get_submodule(n).weight, norms[n], 0.5)), n
    with torch.no_grad():  # block 1 sees what block 0 outputs once pruned
        for n in names[:2]:
            dense.get_submodule(n).weight.mul_(got[n])
    norms = input_sq_norms(dense)
    for n in names[
        2:
    ]:  # block 1's layers, all calibrated before any of them is pruned (as the reference code)
        assert torch.equal(got[n], wanda_mask(dense.get_submodule(n).weight, norms[n], 0.5)), n


# ---- structured pruning --------------------------------------------------------------------------------


def _tiny_llama(layers=3, heads=4, kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


def test_structured_pruning_equals_the_dense_model_with_those_parts_zeroed(tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from trainer.prune.structured import prune_structured, pruned_config

    dense = _tiny_llama()
    small = copy.deepcopy(dense)
    report = prune_structured(small, heads=0.5, mlp_channels=0.25, layers=[1])
    c = small.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        2,
        2,
        1,
        36,
    )
    assert report["params_after"] < report["params_before"]
    shapes = pruned_config(
        dense.config, heads=0.5, mlp_channels=0.25, layers=[1]
    )  # what trainer.export builds
    assert shapes.to_dict() == c.to_dict()
    # Reference: the dense model with the removed parts' outputs zeroed. A zero o_proj column silences a
    # head, a zero down_proj column an MLP channel; a layer with both zero adds nothing to the residual.
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        layers = ref.model.layers
        layers[1].self_attn.o_proj.weight.zero_()
        layers[1].mlp.down_proj.weight.zero_()
        for big, little in zip([layers[0], layers[2]], small.model.layers, strict=True):
            d = big.self_attn.head_dim
            kept_cols = {tuple(col.tolist()) for col in little.self_attn.o_proj.weight.T}
            for j in range(big.self_attn.o_proj.weight.shape[1]):
                if tuple(big.self_attn.o_proj.weight[:, j].tolist()) not in kept_cols:
                    big.self_attn.o_proj.weight[:, j] = 0
            kept = {tuple(col.tolist()) for col in little.mlp.down_proj.weight.T}
            for j in range(big.mlp.down_proj.weight.shape[1]):
                if tuple(big.mlp.down_proj.weight[:, j].tolist()) not in kept:
                    big.mlp.down_proj.weight[:, j] = 0
            assert (
                int((big.self_attn.o_proj.weight.abs().sum(0) == 0).sum()) == 2 * d
            )  # one KV group of 2 heads
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        small.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(ids).logits, small(ids).logits)


def _phi3_of(llama):
    """A Phi-3 holding the Llama's weights with q, k, v fused in qkv_proj and gate, up in gate_up_proj: the same
    function (Phi-3's block is Llama's with those two projections fused)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    c = llama.config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    config = Phi3Config(
        **{f: getattr(c, f) for f in fields},
        num_key_value_heads=c.num_key_value_heads,
        pad_token_id=0,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False,
    )
    phi3 = Phi3ForCausalLM(config).eval()
    state = {}
    for name, value in llama.state_dict().items():
        for parts, fused in (("q_proj k_proj v_proj", "qkv_proj"), ("gate_proj up_proj", "gate_up_proj")):
            first, *rest = parts.split()
            if f".{first}." in name:
                siblings = [name.replace(first, p) for p in (first, *rest)]
                state[name.replace(first, fused)] = torch.cat([llama.state_dict()[n] for n in siblings])
        if not any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            state[name] = value
    phi3.load_state_dict(state)
    return phi3


def test_phi3s_fused_projections_prune_to_the_llama_they_fuse_pruned_alike(tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from trainer.prune.structured import prune_structured, pruned_config

    llama = _tiny_llama()
    phi3 = _phi3_of(llama)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            phi3(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5
        )  # the reference holds
    dense_config = copy.deepcopy(phi3.config)
    prune_structured(llama, heads=0.5, mlp_channels=0.25, layers=[1])
    report = prune_structured(phi3, heads=0.5, mlp_channels=0.25, layers=[1])
    assert (report["num_attention_heads"], report["num_key_value_heads"], report["intermediate_size"]) == (
        2,
        1,
        36,
    )
    assert (
        pruned_config(dense_config, heads=0.5, mlp_channels=0.25, layers=[1]).to_dict()
        == phi3.config.to_dict()
    )
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
        phi3.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(ids).logits, phi3(ids).logits)


def test_gpt_neox_prunes_mlp_channels_and_refuses_heads_its_config_cannot_hold(tmp_path):
    import copy

    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    from trainer.prune.structured import prune_structured

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    dense = GPTNeoXForCausalLM(config).eval()
    with pytest.raises(ConfigError, match=r"prune.heads=0.5 on model_type=gpt_neox: .*prune.heads=0"):
        prune_structured(copy.deepcopy(dense), heads=0.5, mlp_channels=0.0, layers=[])
    small = copy.deepcopy(dense)
    prune_structured(small, heads=0.0, mlp_channels=0.25, layers=[])
    assert small.config.intermediate_size == 36
    # Reference: the dense model with the removed channels' dense_4h_to_h columns zeroed (GELU(x) * 0 adds nothing)
    with torch.no_grad():
        for big, little in zip(dense.gpt_neox.layers, small.gpt_neox.layers, strict=True):
            kept = {tuple(col.tolist()) for col in little.mlp.dense_4h_to_h.weight.T}
            out = big.mlp.dense_4h_to_h.weight
            for j in range(out.shape[1]):
                if tuple(out[:, j].tolist()) not in kept:
                    out[:, j] = 0
            assert int((out.abs().sum(0) == 0).sum()) == 12
        ids = torch.randint(0, 64, (2, 12))
        torch.testing.assert_close(small(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
        small.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(ids).logits, small(ids).logits)


def test_a_structured_pruned_checkpoint_loads_from_its_own_files_and_through_the_old_fallback(tmp_path):
    from trainer.export import load_checkpoint_model

    overrides = [*TINY, "train.max_steps=2", "prune=structured", "prune.heads=0.5", "prune.mlp_channels=0.25"]
    trainer = make_trainer(tmp_path, *overrides)
    trainer.train()
    step = tmp_path / "checkpoints" / "step_00000002"
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer.hf_model.eval()
    with torch.no_grad():
        want = trainer.hf_model(ids).logits
        model, _ = load_checkpoint_model(step, device="cpu")  # no .hydra/: the checkpoint's config.json
        c = model.config
        assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (1, 1, 48)
        assert torch.equal(model(ids).logits, want)
        strip_model_description(step, overrides)  # an old checkpoint: the shapes rebuilt from prune.*
        old, _ = load_checkpoint_model(step, device="cpu")
        assert torch.equal(old(ids).logits, want)


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["prune=magnitude", "prune.sparsity=1.0"], r"prune.sparsity=1.0: must be a fraction in \[0, 1\)"),
        (["prune=wanda", "prune.sparsity=-0.1"], r"prune.sparsity=-0.1"),
        (["prune=gmp", "prune.layer_sparsity={x: 1.5}"], r"layer_sparsity\[x\]=1.5"),
        (["prune=nm", "prune.n=4", "prune.m=4"], r"need 0 < n < m"),
        (["prune=nm", "prune.sparsity=0.5"], r"set prune.n and prune.m"),
        (["prune=structured", "prune.mlp_channels=0"], r"removes nothing"),
        (["prune=keep_zeros", "prune.sparsity=0.5"], r"the loaded model's zeros are the mask"),
        (["prune=keep_zeros", "prune.layer_sparsity={x: 0.5}"], r"does not apply to prune=keep_zeros"),
        (["prune=gmp", "train.max_steps=0"], r"prune=gmp prunes while training"),
    ],
)
def test_bad_prune_values_fail_before_any_work(overrides, match):
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=match):
        validate_config(compose_config(*overrides))


def test_typo_in_a_prune_key_is_refused():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose_config

    with pytest.raises(ConfigCompositionException):
        compose_config("prune=magnitude", "prune.calibration_batch=4")  # only calibrated methods have it


def _pruner(*overrides):
    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv
    from trainer.prune.pruner import Pruner

    cfg = compose_config(*overrides)
    return Pruner(cfg.prune, env=ParallelEnv(), device=torch.device("cpu"), max_steps=10, seed=0)


def test_a_target_pattern_that_matches_no_module_is_refused():
    with pytest.raises(ConfigError, match=r"'model.layers.\*.mlp.nope' matches no module.*model.layers"):
        _pruner("prune=magnitude", "prune.targets=[model.layers.*.mlp.nope]").prepare(
            _tiny_llama(), train_data=None, micro_batch_size=1, resume=None
        )


def test_keep_zeros_masks_exactly_the_zeros_there_are_and_refuses_a_dense_model():
    model = _tiny_llama()
    pruner = _pruner("prune=keep_zeros")
    with pytest.raises(ConfigError, match="keep_zeros: the targeted layers hold no zero weights"):
        pruner.prepare(model, train_data=None, micro_batch_size=1, resume=None)
    weight = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        weight[:, ::4] = 0  # a quarter of one layer, as an earlier pruning run would leave it
    pruner = _pruner("prune=keep_zeros")
    pruner.prepare(model, train_data=None, micro_batch_size=1, resume=None)
    assert set(pruner.masks) == {f"{n}.weight" for n in _targets(model)}
    assert torch.equal(pruner.masks["model.layers.1.mlp.up_proj.weight"], weight != 0)
    assert pruner.target_sparsity["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.25)
    assert all(m.all() for n, m in pruner.masks.items() if n != "model.layers.1.mlp.up_proj.weight")


def _targets(model):
    from trainer.prune.pruner import select_targets

    return select_targets(model, None)


def test_an_nm_group_that_does_not_divide_the_layer_is_refused():
    with pytest.raises(
        ConfigError, match=r"m=5: model.layers.0.* has 32 input features, not a multiple of 5"
    ):
        _pruner("prune=nm", "prune.m=5", "prune.block_size=125").prepare(
            _tiny_llama(), train_data=None, micro_batch_size=1, resume=None
        )


def test_targets_and_per_layer_sparsity_select_what_is_pruned():
    model = _tiny_llama(layers=2)
    pruner = _pruner(
        "prune=magnitude",
        "prune.targets=[model.layers.*.mlp.*,lm_head]",
        "prune.layer_sparsity={model.layers.1.*: 0.25}",
    )
    pruner.prepare(model, train_data=None, micro_batch_size=1, resume=None)
    assert pruner.target_sparsity == {
        **{f"model.layers.0.mlp.{p}.weight": 0.5 for p in ("gate_proj", "up_proj", "down_proj")},
        **{f"model.layers.1.mlp.{p}.weight": 0.25 for p in ("gate_proj", "up_proj", "down_proj")},
        "lm_head.weight": 0.5,
    }
    w = model.model.layers[1].mlp.up_proj.weight
    assert (
        int((w == 0).sum()) == w.numel() // 4
        and int((model.model.layers[0].self_attn.q_proj.weight == 0).sum()) == 0
    )


# ---- end to end ----------------------------------------------------------------------------------------

STEPS = 20
COMMON = [
    *TINY,
    f"train.max_steps={STEPS}",
    "train.micro_batch_size=2",
    "train.log_every=5",
    "scheduler=constant",
    "optimizer.weight_decay=0.1",  # decay must not revive pruned weights either
]
ONE_SHOT = {
    "wanda": ["prune=wanda", "prune.calibration_batches=2"],
    "sparsegpt": ["prune=sparsegpt", "prune.calibration_batches=2"],
}
# Each strategy with one of the calibrated methods (both run on every rank's identical model).
RUNS = {"ddp": "wanda", "fsdp": "sparsegpt", "zero1": "wanda", "zero2": "sparsegpt", "zero3": "wanda"}


@pytest.fixture(scope="module")
def reference_masks(tmp_path_factory):
    """The masks (and pruned weights) a single-process prune of the same model chooses."""
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): the same sums in the same order
    for method, overrides in ONE_SHOT.items():
        trainer = make_trainer(tmp_path_factory.mktemp(f"ref_{method}"), *COMMON, *overrides)
        weights = {n: p.detach().clone() for n, p in trainer.hf_model.named_parameters()}
        out[method] = (trainer.extension("prune").masks, weights)
    torch.set_num_threads(threads)
    return out


def _check_export(run_dir, masks, pruned_weights):
    exported = load_file(str(run_dir / "hf" / "model.safetensors"))
    report = json.loads((run_dir / "hf" / "sparsity.json").read_text())
    assert len(masks) == 14  # 7 linears x 2 blocks
    for name, keep in masks.items():
        w = exported[name]
        assert int((w == 0).sum()) == keep.numel() // 2, name  # exactly 50% in every targeted layer
        assert torch.equal(w != 0, keep), name  # and at the positions chosen at pruning time
        assert not torch.equal(w, pruned_weights[name]), name  # the kept weights did train
        assert report["layers"][name]["sparsity"] == 0.5
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert int((exported[name] == 0).sum()) == 0  # untargeted: untouched by the masks
    logged = [r["sparsity"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged == [0.5] * (STEPS // 5)


@pytest.mark.parametrize("strategy", list(RUNS))
def test_one_shot_masks_hold_through_fine_tuning_on_two_ranks(strategy, reference_masks, tmp_path):
    method = RUNS[strategy]
    run_command([*COMMON, *ONE_SHOT[method], f"strategy={strategy}", f"hydra.run.dir={tmp_path}"], nproc=2)
    _check_export(tmp_path, *reference_masks[method])
    if strategy == "zero3":  # resume its checkpoint on one rank: the masks come back from the shards
        resumed = tmp_path.parent / "resumed"
        shutil.copytree(tmp_path / "checkpoints", resumed / "checkpoints")
        trainer = make_trainer(
            resumed, *COMMON, *ONE_SHOT[method], f"train.max_steps={STEPS + 5}", "resume=auto"
        )
        assert trainer.step == STEPS
        trainer.train()
        for name, keep in reference_masks[method][0].items():
            assert torch.equal(trainer.extension("prune").masks[name], keep)
            assert torch.equal(trainer.hf_model.get_parameter(name) != 0, keep), name


def test_gmp_raises_sparsity_on_schedule_and_never_revives_a_pruned_weight(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on the shared CPU
    trainer = make_trainer(
        tmp_path,
        *COMMON,
        "prune=gmp",
        "prune.sparsity=0.6",
        "prune.frequency=5",
        "prune.end_step=15",
        "train.log_every=1",
        "train.micro_batch_size=8",
    )
    pruned_so_far = {n: torch.zeros_like(m) for n, m in trainer.extension("prune").masks.items()}
    history = []
    for _ in range(STEPS):
        trainer.train_step()
        masks = trainer.extension("prune").masks
        for n, m in masks.items():
            assert not (pruned_so_far[n] & m).any(), "a pruned weight came back"
            pruned_so_far[n] = ~m
            assert torch.equal(trainer.hf_model.get_parameter(n) != 0, m)
        history.append(trainer.extension("prune").metrics()["sparsity"])
    want = [
        gmp_sparsity(s, initial=0.0, final=0.6, start_step=0, end_step=15, frequency=5)
        for s in range(1, STEPS + 1)
    ]
    torch.set_num_threads(threads)
    assert history == pytest.approx(want, abs=1e-3)  # floor() per layer: within one weight in a thousand


# ---- GPT-2: Conv1D layers are linears with transposed weights ------------------------------------------


def _tiny_gpt2(layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=layers, n_head=2, n_positions=64, vocab_size=64)
    return GPT2LMHeadModel(config).eval()


def _with_linears(model):
    """A copy of a GPT-2 whose Conv1D layers are nn.Linear holding the transposed weights (the reference)."""
    import copy

    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, Conv1D):
            linear = torch.nn.Linear(m.weight.shape[0], m.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(m.weight.T)
                linear.bias.copy_(m.bias)
            out.set_submodule(name, linear)
    return out


class _Windows:
    """Training windows as the pruner's calibration reads them (`len`, `batch(indices)`)."""

    def __init__(self, num=8, seq_len=12, vocab=64):
        self.ids = torch.randint(0, vocab, (num, seq_len), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def batch(self, index):
        return Batch(self.ids[index], self.ids[index])


@pytest.mark.parametrize(
    "overrides",
    [
        ["prune=magnitude"],
        ["prune=wanda", "prune.calibration_batches=2"],
        ["prune=sparsegpt", "prune.calibration_batches=2", "prune.block_size=16"],
        ["prune=nm", "prune.block_size=16"],
        ["prune=nm", "prune.criterion=wanda", "prune.calibration_batches=2", "prune.block_size=16"],
    ],
    ids=["magnitude", "wanda", "sparsegpt", "nm", "nm-wanda"],
)
def test_gpt2_conv1d_is_pruned_as_the_linear_holding_its_transposed_weight(overrides):
    gpt2 = _tiny_gpt2()
    reference = _with_linears(gpt2)
    pruned = {}
    for model in (gpt2, reference):
        pruner = _pruner(*overrides)
        pruner.prepare(model, train_data=_Windows(), micro_batch_size=2, resume=None)
        pruned[model] = pruner.masks
    assert set(pruned[gpt2]) == set(pruned[reference]) and len(pruned[gpt2]) == 8  # 4 Conv1D x 2 blocks
    for name, keep in pruned[gpt2].items():
        conv, linear = gpt2.get_parameter(name), reference.get_parameter(name)
        assert keep.shape == conv.shape and torch.equal(keep, pruned[reference][name].T), name
        torch.testing.assert_close(conv, linear.T, rtol=0, atol=1e-6)  # sparsegpt's updates too
        if "nm" in overrides[0]:  # 2 of every 4 consecutive inputs of an output: along Conv1D's rows
            assert int((conv.T.reshape(-1, 4) != 0).sum(1).max()) <= 2


def test_a_pruning_config_that_selects_no_layer_is_refused_naming_the_layers_there_are():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Parameter(torch.ones(4, 4))  # 2-D, but no linear layer

    class Model(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.blocks = torch.nn.ModuleList([Block()])

    with pytest.raises(
        ConfigError, match=r"prune.targets=null .* blocks hold none .*Embedding.* \['embed'\]"
    ):
        _pruner("prune=wanda").prepare(Model(), train_data=None, micro_batch_size=1, resume=None)


def test_structured_pruning_of_gpt2_is_refused_naming_its_fused_conv1d():
    with pytest.raises(ConfigError, match=r"model_type=gpt2's GPT2Block is not one .*fused GPT-2 Conv1D"):
        _pruner("prune=structured", "prune.heads=0.5").prepare(
            _tiny_gpt2(), train_data=None, micro_batch_size=1, resume=None
        )


def test_a_gpt2_run_prunes_its_conv1d_layers_and_exports_the_zeros(tmp_path):
    """The run that crashed on a ZeroDivisionError (no layer targeted): wanda on every Conv1D, masks held."""
    make_trainer(
        tmp_path,
        *TINY,
        "model.arch.model_type=gpt2",
        "prune=wanda",
        "prune.calibration_batches=2",
        "train.max_steps=2",
    ).train()
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert len(report["layers"]) == 8 and report["sparsity"] == pytest.approx(0.5)
    c_attn = load_file(str(tmp_path / "hf" / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (32, 96)  # [in, out]: wanda removes half of each output's inputs, a column here
    assert ((c_attn == 0).sum(0) == 16).all()


def test_an_moe_with_fused_experts_is_refused_by_default_and_prunes_the_layers_named():
    from tests.conftest import compose_config
    from tests.model_matrix import FAMILIES, TINY_SHAPES
    from trainer.models import build_model

    cfg = compose_config(*TINY_SHAPES, *FAMILIES["qwen2_moe"].overrides)
    torch.manual_seed(0)
    moe = build_model(cfg.model, vocab_size=64)
    with pytest.raises(
        ConfigError, match=r"model_type=qwen2_moe: its routed experts .*mlp.experts.gate_up_proj"
    ):
        _pruner("prune=magnitude").prepare(moe, train_data=None, micro_batch_size=1, resume=None)
    experts = moe.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    pruner = _pruner("prune=magnitude", "prune.targets=[*.self_attn.*]")
    pruner.prepare(moe, train_data=None, micro_batch_size=1, resume=None)
    assert sorted(pruner.masks) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"
    )
    assert float((moe.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    assert torch.equal(moe.model.layers[0].mlp.experts.gate_up_proj, experts)
