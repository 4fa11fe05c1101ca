"""The stage-2 config: reference defaults, shipped recipes, validation before any process group, and the
learning-rate schedule (megatron-core's formulas, as a pure function)."""

import glob
import json
import os

import pytest

from megatron_moca.config.finetune import FinetuneConfig, load_finetune_config
from megatron_moca.errors import UserError
from megatron_moca.training.schedule import learning_rate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf_folder(folder):
    from megatron_moca.config.model import preset
    from megatron_moca.conversion.hf_config import hf_config_from_model

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_from_model(preset("tiny"), "bfloat16"), f)
    return str(folder)


def valid(tmp_path, *overrides):
    (tmp_path / "pairs").mkdir(exist_ok=True)
    return load_finetune_config(None, [f"model.path={hf_folder(tmp_path / 'hf')}", f"data.paths={tmp_path / 'pairs'}",
                                       f"checkpoint.save={tmp_path / 'run'}", *overrides])


def test_defaults_are_the_reference_stage2_settings():
    cfg = FinetuneConfig()
    assert (cfg.optim.lr, cfg.optim.lr_warmup_fraction, cfg.optim.lr_decay_style, cfg.optim.clip_grad) == \
        (2e-5, 0.05, "linear", 5.0)
    assert (cfg.objective.temperature, cfg.objective.hard_negatives) == (0.03, 2)
    assert (cfg.data.max_length, cfg.data.max_rows_per_subset, cfg.data.sampler) == (1280, 50000, "mixed")
    assert (cfg.data.image.min_pixels, cfg.data.image.max_pixels) == (256 * 28 * 28, 1024 * 28 * 28)
    assert cfg.model.compute_dtype == "bfloat16" and cfg.train.train_iters is None  # one epoch
    assert (cfg.iterations(steps_per_epoch=200), cfg.warmup_iters(200)) == (200, 10)


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(REPO, "examples", "finetune_*.yaml"))))
def test_shipped_recipes_load(recipe, tmp_path):
    (tmp_path / "pairs").mkdir()
    cfg = load_finetune_config(recipe, [f"model.path={hf_folder(tmp_path / 'hf')}", f"data.paths={tmp_path / 'pairs'}",
                                        f"checkpoint.save={tmp_path / 'run'}"])
    cfg.validate(world_size=8 if "qwen25vl" in recipe else 1)


@pytest.mark.parametrize("override, world, message", [
    ("model.path=", 1, "model.path is not set"),
    ("train.global_batch_size=6", 4, "not a multiple of the data-parallel size 4"),
    ("optim.lr_decay_style=WSD", 1, "expected one of constant, linear, cosine"),
    ("model.compute_dtype=float16", 1, "model.compute_dtype='float16'"),
    ("checkpoint.save=", 1, "checkpoint.save is not set"),
    ("data.paths=/no/such/pairs", 1, "data.paths: /no/such/pairs does not exist"),
    ("data.sampler=by_task", 1, "expected one of mixed, single_task"),
    ("train.micro_batch_size=0", 1, "train.micro_batch_size must be >= 1"),
    ("objective.temperature=0", 1, "objective.temperature=0.0 must be within"),
])
def test_bad_settings_are_named(tmp_path, override, world, message):
    cfg = valid(tmp_path, override)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate(world)


def test_a_model_that_is_not_qwen25vl_is_refused(tmp_path):
    cfg = valid(tmp_path)
    with open(os.path.join(cfg.model.path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    with pytest.raises(UserError, match="model_type='llama' is not Qwen2.5-VL"):
        cfg.validate(1)


def test_learning_rate_warms_up_then_decays_like_megatron():
    args = dict(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=12)
    assert [learning_rate(i, style="linear", **args) for i in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert learning_rate(8, style="linear", **args) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(8, style="cosine", **args) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi/2) = 0
    assert learning_rate(6, style="cosine", **args) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5))
    assert learning_rate(12, style="linear", **args) == pytest.approx(0.1)
    assert learning_rate(13, style="linear", **args) == 0.1 and learning_rate(13, style="constant", **args) == 1.0


def test_the_release_dtype_defaults_to_the_starting_models_under_either_key():
    from megatron_moca.training.finetune import starting_dtype

    assert starting_dtype({"torch_dtype": "float16"}) == "float16"  # transformers 4
    assert starting_dtype({"dtype": "float32"}) == "float32"  # transformers 5 (was: bfloat16)
    assert starting_dtype({"dtype": "float32", "torch_dtype": "bfloat16"}) == "float32"
    assert starting_dtype({}) == "bfloat16"


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.fsdp_shard_size=2"], 4, "parallel.fsdp_shard_size is set but parallel.fsdp is false"),
    (["parallel.fsdp=true", "parallel.fsdp_shard_size=3"], 4, "must be >= 1 and divide the 4 data-parallel ranks"),
    (["parallel.fsdp=true", "parallel.fsdp_shard_size=0"], 4, "must be >= 1 and divide"),
    (["parallel.gradient_reduction=avg"], 1, "parallel.gradient_reduction='avg': expected one of sum, mean"),
])
def test_sharding_settings_are_checked(tmp_path, overrides, world, message):
    with pytest.raises(UserError, match=message):
        valid(tmp_path, "train.global_batch_size=4", *overrides).validate(world)
    valid(tmp_path, "train.global_batch_size=4", "parallel.fsdp=true", "parallel.fsdp_shard_size=2").validate(4)
