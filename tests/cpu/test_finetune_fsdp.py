"""Stage 2 sharded with torch FSDP2 on gloo: the same training as one process (fp32: losses and gradient
norms to rel 1e-4), with GradCache, hard negatives (2 per text row, 1 per image row: chunk counts differ
between ranks), text-only and image rows on different ranks, HSDP; bit-exact resume at the same world size,
resume at another; the release equals the replicated path's tensor for tensor and MocaEmbedder loads it; the
gradient scale of parallel.gradient_reduction."""

import os
import shutil

import pytest
import torch

from helpers import REPO, read_metrics, run_moca, run_torchrun, write_pairs

SMALL = ["model.compute_dtype=float32", "train.global_batch_size=4", "data.max_length=128", "data.num_workers=0",
         "data.image.min_pixels=3136", "data.image.max_pixels=12544", "logging.log_interval=1", "train.train_iters=3",
         "optim.lr=2e-4", "checkpoint.save_interval=100"]
CLI = os.path.join(REPO, "megatron_moca", "cli.py")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _run(nproc, tiny_hf_dir, pairs, save, *more):
    args = ["finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={save}", *SMALL, *more]
    proc = run_torchrun(nproc, CLI, *args) if nproc > 1 else run_moca(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_same_training(base, other):
    assert [r["step"] for r in other] == [r["step"] for r in base]
    for x, y in zip(base, other):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        # (accuracy is not compared: the pairs repeat six pictures, so some logits tie exactly and argmax
        # follows the rounding; the bit-exact resume compares it)


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.fixture(scope="module")
def replicated(tiny_hf_dir, pairs, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("one") / "run")
    _run(1, tiny_hf_dir, pairs, save)
    return save


@pytest.fixture(scope="module")
def fsdp2(tiny_hf_dir, pairs, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("fsdp2") / "run")
    _run(2, tiny_hf_dir, pairs, save, "parallel.fsdp=true")
    return save


def test_fsdp_trains_as_one_process_and_resumes_exactly(tiny_hf_dir, pairs, replicated, fsdp2, tmp_path):
    straight = fsdp2
    stopped, resharded, hsdp = (str(tmp_path / n) for n in ("stopped", "resharded", "hsdp"))
    _run(2, tiny_hf_dir, pairs, stopped, "parallel.fsdp=true", "train.exit_interval=2")
    checkpoint = os.path.join(stopped, "iter_0000002")
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt",
            "trainer_state.json"} <= set(os.listdir(checkpoint))
    shutil.copytree(stopped, resharded)
    _refuses_a_planted_payload(stopped, tiny_hf_dir, pairs, tmp_path)
    resumed = _run(2, tiny_hf_dir, pairs, stopped, "parallel.fsdp=true")
    assert "resumed from" in resumed.stderr
    assert _numbers(read_metrics(stopped)) == _numbers(read_metrics(straight))  # bit for bit
    _assert_same_training(read_metrics(replicated), read_metrics(straight))
    # 4 ranks (one pair each: text-only ranks next to image ranks): the 2-rank shards redistributed, the
    # global batches the same - over FSDP, and over HSDP 2 x 2 with GradCache chunks of one input
    # (hard-negative chunk counts padded)
    shutil.copytree(resharded, hsdp)
    _run(4, tiny_hf_dir, pairs, resharded, "parallel.fsdp=true")
    _run(4, tiny_hf_dir, pairs, hsdp, "parallel.fsdp=true", "parallel.fsdp_shard_size=2", "train.micro_batch_size=1")
    for save in (resharded, hsdp):
        _assert_same_training(read_metrics(replicated), read_metrics(save))
    # a replicated run does not take an FSDP checkpoint (nor the reverse)
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={stopped}",
                    *SMALL, "train.train_iters=4")
    assert proc.returncode == 2 and "fsdp was True and is now False" in proc.stderr


class _Payload:
    """Pickles as a call of os.system: unpickling it unrestricted creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _refuses_a_planted_payload(run, tiny_hf_dir, pairs, tmp_path):
    """The FSDP resume path audits the torch.distributed.checkpoint folder before torch unpickles it: a
    `.metadata` carrying a payload is refused in one line and the payload never runs."""
    import pickle

    planted = str(tmp_path / "planted")
    shutil.copytree(run, planted, copy_function=os.link)
    metadata = os.path.join(planted, "iter_0000002", ".metadata")
    os.unlink(metadata)  # breaks the hard link: the run keeps its file
    marker = str(tmp_path / "PWNED")
    with open(metadata, "wb") as f:
        pickle.dump(_Payload(marker), f)
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={planted}",
                    *SMALL, "parallel.fsdp=true")
    assert proc.returncode == 2 and not os.path.exists(marker), proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"moca: error: {metadata}: refused to load: it asks for "
                                                           "posix.system")


def _numbers(records):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["accuracy"]) for r in records]


def test_fsdp_with_grad_cache_trains_as_one_process(tiny_hf_dir, pairs, replicated, tmp_path):
    """One input per GradCache chunk (ranks embed different numbers of hard-negative chunks: padded), each
    layer recomputed in the backward (model.gradient_checkpointing)."""
    save = str(tmp_path / "fsdp2")
    _run(2, tiny_hf_dir, pairs, save, "parallel.fsdp=true", "train.micro_batch_size=1",
         "model.gradient_checkpointing=true")
    _assert_same_training(read_metrics(replicated), read_metrics(save))


def test_fsdp_release_equals_the_replicated_release_and_mean_is_the_references_scale(tiny_hf_dir, pairs, replicated,
                                                                                     tmp_path):
    """The same training on 2 ranks, replicated (ZeRO-1) and FSDP, with parallel.gradient_reduction=mean:
    releases equal tensor for tensor (clipping off: the clip coefficient comes from the gradient norm,
    which FSDP sums shard by shard, so with clipping the weights differ in the last bits), and the first
    step's gradient norm is half the one-process (global-batch) norm - the reference's DeepSpeed mean."""
    from megatron_moca.embed.embedder import MocaEmbedder

    releases = []
    for fsdp in ("false", "true"):
        save = str(tmp_path / f"fsdp_{fsdp}")
        _run(2, tiny_hf_dir, pairs, save, f"parallel.fsdp={fsdp}", "optim.clip_grad=0",
             "parallel.gradient_reduction=mean")
        first, base = read_metrics(save)[0], read_metrics(replicated)[0]
        assert first["loss"] == pytest.approx(base["loss"], rel=1e-5)
        assert first["grad_norm"] == pytest.approx(base["grad_norm"] / 2, rel=1e-4)  # taken before any clipping
        releases.append(os.path.join(save, "release"))
    ours, theirs = releases[1], releases[0]
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    for name in os.listdir(ours):
        if not name.endswith(".safetensors") and name not in ("moca_training.json", "README.md"):  # sharding
            assert open(os.path.join(ours, name)).read() == open(os.path.join(theirs, name)).read(), name
    a, b = _weights(ours), _weights(theirs)
    assert sorted(a) == sorted(b) and "lm_head.weight" not in a  # the tiny model ties its head
    assert all(a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in a)
    items = ["a harbour at dawn", {"text": "<|vision_start|><|image_pad|><|vision_end|> a picture",
                                   "images": [os.path.join(pairs, "images", "p0.png")]}]
    assert torch.equal(MocaEmbedder(ours, device="cpu").embed(items), MocaEmbedder(theirs, device="cpu").embed(items))


def test_fsdp_in_bf16_trains_as_the_replicated_bf16_run(tiny_hf_dir, pairs, tmp_path):
    """bf16 compute: FSDP casts the fp32 master weights to bf16 for each unit (MixedPrecisionPolicy), the
    replicated path autocasts; both round differently, so the losses agree to bf16's precision."""
    runs = []
    for nproc, more in ((1, []), (2, ["parallel.fsdp=true"])):
        save = str(tmp_path / f"bf16_{nproc}")
        _run(nproc, tiny_hf_dir, pairs, save, "model.compute_dtype=bfloat16", "train.train_iters=2", *more)
        runs.append(read_metrics(save))
    for x, y in zip(*runs):
        assert y["loss"] == pytest.approx(x["loss"], rel=3e-2)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=3e-2)
