"""The stage-1 config: YAML sections + dotted overrides, strict keys and types, presets, validation."""

import dataclasses
import glob
import os

import pytest

from megatron_moca.config.loading import apply_overrides, build, load_config, to_dict
from megatron_moca.config.pretrain import PretrainConfig, load_pretrain_config
from megatron_moca.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_shards_manifest(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write('{"shards": []}')
    return str(folder)


def test_overrides_are_parsed_for_the_type_of_their_field(tmp_path):
    (tmp_path / "r.yaml").write_text("model:\n  preset: tiny\noptim:\n  lr: 2.0e-6\ntrain:\n  train_iters: 7\n")
    cfg = load_pretrain_config(str(tmp_path / "r.yaml"), [
        "optim.lr=1e-3",  # YAML 1.1 would read "1e-3" as a string
        "data.paths=/a,/b", "data.weights=[1, 3]", "checkpoint.load=null", "model.language.num_layers=2",
        "parallel.use_distributed_optimizer=false", "tokenizer=/tok"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.paths == ["/a", "/b"] and cfg.data.weights == [1.0, 3.0]
    assert cfg.checkpoint.load is None and cfg.parallel.use_distributed_optimizer is False
    assert cfg.train.train_iters == 7 and cfg.tokenizer == "/tok"
    # the preset fills what the file does not set; the override wins over both
    assert cfg.model.language.num_layers == 2 and cfg.model.language.hidden_size == 64 and cfg.model.vision.depth == 4


def test_resolved_config_round_trips():
    cfg = load_config(PretrainConfig, None, ["model.preset=qwen25vl_7b", "train.seed=3"])
    again = build(PretrainConfig, to_dict(cfg))
    assert again == cfg and again.model.language.hidden_size == 3584


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "config key optim.lr: expected float, got 'fast'"),
    ("train.seed=1.5", "config key train.seed: expected int"),
    ("parallel.use_distributed_optimizer=maybe", "expected true or false"),
    ("optim.betas=1", "unknown config key(s) optim.betas in section optim; valid keys: lr,"),
    ("nonsense=1", "unknown config key(s) nonsense in the top level"),
    ("model.language.heads=4", "unknown config key(s) model.language.heads"),
    ("model.preset=huge", "unknown model preset 'huge'"),
    ("optim.lr", "expected key=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(UserError) as err:
        load_config(PretrainConfig, None, [override])
    assert message in str(err.value)


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrain_config(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_pretrain_config(str(tmp_path / "bad.yaml"))


def valid(tmp_path, **changes):
    cfg = load_config(PretrainConfig, None, ["model.preset=tiny", f"checkpoint.save={tmp_path / 'run'}",
                                             f"data.paths={write_shards_manifest(tmp_path / 'shards')}"])
    for section, values in changes.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


def test_validation_before_any_process_group(tmp_path):
    valid(tmp_path).validate(world_size=1)
    cases = [
        (dict(parallel=dict(tensor_model_parallel_size=2)), 3, "world size 3"),
        (dict(parallel=dict(tensor_model_parallel_size=4)), 4, "must divide the 2 KV heads"),
        (dict(train=dict(micro_batch_size=2, global_batch_size=6)), 2, "not a multiple of micro_batch_size x "
                                                                      "data-parallel size = 2 x 2"),
        (dict(optim=dict(lr_warmup_iters=2000)), 1, "lr_warmup_iters=2000 must be below lr_decay_iters (1000"),
        (dict(optim=dict(lr_decay_style="step")), 1, "lr_decay_style='step'"),
        (dict(checkpoint=dict(save=None)), 1, "checkpoint.save is not set"),
        (dict(checkpoint=dict(load="/nowhere")), 1, "checkpoint.load=/nowhere: no such directory"),
        (dict(data=dict(paths=[str(tmp_path)])), 1, "has no manifest.json"),
        (dict(data=dict(pack_length=1000)), 1, "sample.max_length=1280 exceeds data.pack_length=1000"),
        # bounds where AdamW would overflow or divide by zero, each just past the bound
        (dict(optim=dict(lr=3.4e38)), 1, "optim.lr=3.4e+38: AdamW's first step, lr / (1 - adam_beta1) = 3.4e+39, "
                                         "overflows float32"),
        (dict(optim=dict(lr=3.41e37)), 1, "lr / (1 - adam_beta1) = 3.41e+38, overflows float32"),
        (dict(optim=dict(lr=3.41e38, adam_beta1=0.0)), 1, "lr / (1 - adam_beta1) = 3.41e+38, overflows float32"),
        (dict(optim=dict(adam_beta2=1.0)), 1, "optim.adam_beta2=1.0: must be within [0, 1)"),
        (dict(optim=dict(adam_beta1=-0.1)), 1, "optim.adam_beta1=-0.1: must be within [0, 1)"),
        (dict(optim=dict(adam_eps=0.0)), 1, "optim.adam_eps=0.0: must be > 0"),
        (dict(optim=dict(lr=1e30, weight_decay=1e9)), 1, "with lr x weight_decay <= 3.4e+38"),
        (dict(optim=dict(weight_decay=-0.01)), 1, "need weight_decay >= 0"),
        (dict(optim=dict(clip_grad=-1.0)), 1, "clip_grad >= 0"),
        (dict(objective=dict(mae_weight=1001.0)), 1, "objective.mae_weight=1001.0: must be within (0, 1000]"),
    ]
    for changes, world, message in cases:
        with pytest.raises(UserError) as err:
            valid(tmp_path, **changes).validate(world_size=world)
        assert message in str(err.value), (changes, str(err.value))


def test_the_bounds_themselves_are_accepted(tmp_path):
    valid(tmp_path, optim=dict(lr=3.4e37, min_lr=3.4e37, adam_beta1=0.9, weight_decay=10.0, adam_eps=1e-30),
          objective=dict(mae_weight=1000.0)).validate(world_size=1)
    valid(tmp_path, optim=dict(lr=3.4e38, adam_beta1=0.0, lr_warmup_iters=0)).validate(world_size=1)


BOMB = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] +
                 [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"


def test_yaml_aliases_that_expand_beyond_the_limit_are_refused_before_anything_is_built(tmp_path):
    from megatron_moca.config.loading import MAX_YAML_VALUES

    (tmp_path / "bomb.yaml").write_text(BOMB)  # 9 lines, 9**9 strings once expanded
    with pytest.raises(UserError, match=f"aliases expand to more than {MAX_YAML_VALUES} values"):
        load_pretrain_config(str(tmp_path / "bomb.yaml"))
    # the limit counts expanded nodes: the root, 2 keys, x (1 + 24,998) and y (1 + 3 copies of x) make exactly
    # 100,000 and pass; one more key and value do not
    under = "x: &x [" + ", ".join(["1"] * 24998) + "]\ny: [*x, *x, *x]\n"
    (tmp_path / "under.yaml").write_text(under)
    (tmp_path / "over.yaml").write_text(under + "z: 1\n")
    from megatron_moca.config.loading import read_yaml

    assert len(read_yaml(str(tmp_path / "under.yaml"))["y"]) == 3
    with pytest.raises(UserError, match="aliases expand"):
        read_yaml(str(tmp_path / "over.yaml"))
    (tmp_path / "shared.yaml").write_text("base: &b {lr: 0.001}\noptim: *b\n")  # ordinary aliases still work
    assert read_yaml(str(tmp_path / "shared.yaml"))["optim"] == {"lr": 0.001}


def test_warmup_defaults_to_a_tenth_of_the_decay(tmp_path):
    cfg = valid(tmp_path, train=dict(train_iters=3311))
    assert (cfg.lr_decay_iters, cfg.lr_warmup_iters) == (3311, 331)
    assert cfg.optim.lr == 2e-6 and cfg.optim.clip_grad == 5.0 and cfg.optim.lr_decay_style == "linear"
    assert cfg.objective.mae_weight == 0.5 and cfg.sample.mlm_probability == 0.4 and cfg.sample.mae_probability == 0.5


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(REPO, "examples", "pretrain_*.yaml"))))
def test_shipped_recipes_load(recipe, tmp_path):
    cfg = load_pretrain_config(recipe, [f"checkpoint.save={tmp_path}", f"data.paths={write_shards_manifest(tmp_path / 's')}"])
    cfg.validate(world_size=cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)


def test_apply_overrides_keeps_the_input():
    values = {"optim": {"lr": 1.0}}
    out = apply_overrides(PretrainConfig, values, ["optim.lr=2"])
    assert values == {"optim": {"lr": 1.0}} and out == {"optim": {"lr": 2.0}}
