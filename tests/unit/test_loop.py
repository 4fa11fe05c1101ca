"""The training loop both stages share (training/loop.py), driven by a stage whose every step is known: which
iterations run, what each save and the epilogue are told, what each record says, where an early stop ends,
the non-finite guard (nothing of a bad step applied), a full disk on a save or on config.yaml as one line,
and nothing else turned into one."""

import errno
import json
import os

import pytest
import yaml

from megatron_moca.training.loop import (LOW_SPACE, LoopSettings, NonFiniteStep, StepOutput, TrainingError,
                                         disk_full, open_run_directory, train, write_resolved_config)


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    started = not dist.is_initialized()  # in a full run another test's one-process group may be up already
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


class FakeStage:
    """Step i (1-based) has loss 1/i, 10*i tokens and 3 FLOPs per token; its update returns the gradient
    norm i + 0.5 (megatron's way) unless the step knew it before (stage 2's way: `norm_first`). `bad`
    makes step `bad` non-finite at `where`; everything the loop asked for is recorded."""

    def __init__(self, bad=None, where=None, norm_first=False, save_error=None):
        self.bad, self.where, self.norm_first, self.save_error = bad, where, norm_first, save_error
        self.steps, self.applied, self.saved, self.finished = [], [], [], None

    def forward_backward(self, iteration):
        step = iteration + 1
        self.steps.append(iteration)
        value = float("nan") if step == self.bad else 1.0
        norm = step + 0.25 if self.norm_first else None
        if self.where == "grad_norm":
            norm = value
        return StepOutput(loss=value / step if self.where == "loss" or step != self.bad else 1.0 / step,
                          lr=0.01 * step, tokens=10.0 * step, flops=30.0 * step, parts={"mlm_loss": 2.0 * step},
                          grad_norm=norm)

    def apply_update(self):
        self.applied.append(len(self.steps))
        if self.where == "norm_after" and len(self.steps) == self.bad:
            return float("inf")
        return len(self.steps) + 0.5

    def extra_metrics(self):
        return {"extra": len(self.steps)}

    def save(self, iteration, consumed_tokens):
        if self.save_error is not None:
            raise self.save_error
        self.saved.append((iteration, consumed_tokens))

    def finish(self, iteration, consumed_tokens):
        self.finished = (iteration, consumed_tokens)


def settings(tmp_path, train_iters=5, log_interval=2, save_interval=2, exit_interval=None):
    return LoopSettings(str(tmp_path), train_iters=train_iters, log_interval=log_interval,
                        save_interval=save_interval, exit_interval=exit_interval, world_size=1)


def records(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


def tokens_through(step):
    return sum(10.0 * i for i in range(1, step + 1))


@pytest.fixture
def closes(monkeypatch):
    """How many times the loop closed its metrics writer."""
    from megatron_moca.training.metrics import MetricsWriter

    count, close = [0], MetricsWriter.close

    def counted(self):
        count[0] += 1
        close(self)

    monkeypatch.setattr(MetricsWriter, "close", counted)
    return count


def test_a_run_logs_saves_and_finishes_with_the_running_token_count(one_process_group, closes, tmp_path):
    stage = FakeStage()
    last = train(stage, settings(tmp_path), 0)
    assert closes == [1]
    assert stage.steps == [0, 1, 2, 3, 4] and stage.applied == [1, 2, 3, 4, 5]
    assert stage.saved == [(2, tokens_through(2)), (4, tokens_through(4)), (5, tokens_through(5))]
    assert stage.finished == (5, tokens_through(5))
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == [2, 4, 5] and logged[-1] == last
    for r in logged:
        step = r["step"]
        assert (r["loss"], r["mlm_loss"], r["lr"], r["grad_norm"]) == (1.0 / step, 2.0 * step, 0.01 * step, step + 0.5)
        assert r["consumed_tokens"] == tokens_through(step) and r["extra"] == step


def test_a_resumed_run_goes_on_from_its_iteration_and_count(one_process_group, tmp_path):
    stage = FakeStage(norm_first=True)
    train(stage, settings(tmp_path), 3, consumed_tokens=1000.0)
    assert stage.steps == [3, 4] and stage.applied == [1, 2]  # steps 4 and 5 only
    assert stage.saved == [(4, 1040.0), (5, 1090.0)] and stage.finished == (5, 1090.0)
    # a gradient norm known before the update (stage 2 clips first) is the one recorded
    assert [(r["step"], r["grad_norm"]) for r in records(tmp_path)] == [(4, 4.25), (5, 5.25)]


def test_exit_interval_stops_after_saving_and_still_finishes(one_process_group, tmp_path):
    stage = FakeStage()
    train(stage, settings(tmp_path, train_iters=10, save_interval=100, exit_interval=3), 0)
    assert stage.steps == [0, 1, 2] and [s for s, _ in stage.saved] == [3] and stage.finished == (3, tokens_through(3))
    assert [r["step"] for r in records(tmp_path)] == [2]


def test_a_run_already_at_its_end_takes_no_step(one_process_group, tmp_path):
    stage = FakeStage()
    assert train(stage, settings(tmp_path), 5, consumed_tokens=7.0) == {}
    assert stage.steps == [] and stage.saved == [] and stage.finished == (5, 7.0)


@pytest.mark.parametrize("where, applied, when", [("loss", [1, 2], "before applying it"),
                                                   ("grad_norm", [1, 2], "before applying it"),
                                                   ("norm_after", [1, 2, 3], "after applying it")])
def test_the_loop_applies_nothing_of_a_non_finite_step(where, applied, when, one_process_group, closes, tmp_path):
    stage = FakeStage(bad=3, where=where)
    with pytest.raises(TrainingError) as err:
        train(stage, settings(tmp_path, train_iters=6, log_interval=1), 0)
    assert closes == [1]  # the writer is closed on the way out too
    what = "loss" if where == "loss" else "gradient norm"
    assert str(err.value).startswith(f"non-finite {what} (")
    assert f"at iteration 3: the run stopped {when}; the last good checkpoint is {tmp_path}/iter_0000002" in str(err.value)
    assert stage.applied == applied and [s for s, _ in stage.saved] == [2] and stage.finished is None


def test_a_non_finite_value_the_stage_found_itself_stops_before_any_checkpoint(one_process_group, tmp_path):
    class Raising(FakeStage):
        def forward_backward(self, iteration):
            raise NonFiniteStep("gradient", float("nan"))

    stage = Raising()
    with pytest.raises(TrainingError) as err:
        train(stage, settings(tmp_path), 0)
    assert str(err.value) == ("non-finite gradient (nan) at iteration 1: the run stopped before applying it; no "
                              "checkpoint was written yet - lower optim.lr or check the data")
    assert str(NonFiniteStep("loss", 1)) == "non-finite loss" and stage.applied == []


def test_a_full_disk_on_a_save_is_one_line_naming_the_last_complete_checkpoint(one_process_group, tmp_path):
    stage = FakeStage()
    stage.save = lambda iteration, tokens: (stage.saved.append((iteration, tokens)) if iteration < 4 else
                                            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(TrainingError) as err:
        train(stage, settings(tmp_path), 0)
    assert str(err.value) == (f"the checkpoint of iteration 4 could not be written: no space left on device under "
                              f"{tmp_path}; the last complete checkpoint is {tmp_path}/iter_0000002 - free space and "
                              "rerun the same command to resume")


@pytest.mark.parametrize("error, free", [
    (OSError(errno.EACCES, "Permission denied"), LOW_SPACE), (RuntimeError("a bug"), LOW_SPACE),
    (KeyboardInterrupt(), 0),  # even with the disk full: an interrupt is not a full disk
])
def test_other_save_failures_pass_through_as_they_are(error, free, one_process_group, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda folder: namedtuple("usage", "total used free")(1, 1, free))
    with pytest.raises(type(error)) as err:
        train(FakeStage(save_error=error), settings(tmp_path), 0)
    assert err.value is error


def test_disk_full_reads_the_whole_error_chain_then_the_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    def chained(inner, how):
        outer = RuntimeError("megatron: unexpected pos 704 vs 598")
        setattr(outer, how, inner)
        return outer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1, 1, LOW_SPACE))  # exactly enough
    assert disk_full(OSError(errno.ENOSPC, "x"), str(tmp_path)) and disk_full(OSError(errno.EDQUOT, "x"), str(tmp_path))
    assert disk_full(chained(OSError(errno.ENOSPC, "x"), "__cause__"), str(tmp_path))
    assert disk_full(chained(chained(OSError(errno.EDQUOT, "x"), "__context__"), "__cause__"), str(tmp_path))
    assert not disk_full(chained(OSError(errno.EIO, "x"), "__context__"), str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1, 1, LOW_SPACE - 1))
    assert disk_full(RuntimeError("unexpected pos 704 vs 598"), str(tmp_path)) and LOW_SPACE == 64 * 2**20

    def unreadable(folder):
        raise OSError(errno.ENOENT, "gone")

    monkeypatch.setattr(shutil, "disk_usage", unreadable)
    assert not disk_full(RuntimeError("x"), str(tmp_path))


def test_the_prologue_claims_the_folder_and_writes_the_resolved_config(one_process_group, tmp_path):
    from megatron_moca.config.loading import to_dict
    from megatron_moca.ownership import is_ours
    from megatron_moca.config.pretrain import PretrainConfig

    cfg = PretrainConfig()
    cfg.checkpoint.save = str(tmp_path / "run")
    open_run_directory(cfg, None, 0, "moca pretrain")
    assert is_ours(cfg.checkpoint.save) and sorted(os.listdir(cfg.checkpoint.save)) == [".megatron_moca",
                                                                                        "config.yaml"]
    written = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert written == to_dict(cfg) and list(written) == list(to_dict(cfg))  # in the config's own order
    cfg.train.train_iters += 1  # written again, replaced whole
    write_resolved_config(cfg)
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["train"]["train_iters"] == cfg.train.train_iters


def test_a_full_disk_on_config_yaml_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from megatron_moca.config.pretrain import PretrainConfig

    cfg = PretrainConfig()
    cfg.checkpoint.save = str(tmp_path)
    (tmp_path / "config.yaml").write_text("the earlier one\n")

    def no_space(data, stream, **kwargs):
        stream.write("train:\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", no_space)
    with pytest.raises(TrainingError) as err:
        write_resolved_config(cfg)
    assert str(err.value) == (f"{tmp_path}/config.yaml: no space left on device; free space under {tmp_path} and "
                              "rerun the same command")
    assert os.listdir(tmp_path) == ["config.yaml"] and (tmp_path / "config.yaml").read_text() == "the earlier one\n"


def test_loop_settings_mirror_to_wandb_only_when_a_project_is_named():
    from megatron_moca.config.pretrain import PretrainConfig

    cfg = PretrainConfig()
    cfg.checkpoint.save, cfg.logging.log_interval, cfg.checkpoint.save_interval = "/runs/a", 3, 7
    plain = LoopSettings.of(cfg, 11, 4, device="cuda:1")
    assert (plain.save, plain.train_iters, plain.log_interval, plain.save_interval, plain.world_size, plain.device,
            plain.wandb) == ("/runs/a", 11, 3, 7, 4, "cuda:1", None)
    cfg.logging.wandb_project, cfg.logging.wandb_run_name = "moca", "first"
    mirrored = LoopSettings.of(cfg, 11, 4).wandb
    assert mirrored["project"] == "moca" and mirrored["name"] == "first" and mirrored["config"]["train"]["train_iters"]
