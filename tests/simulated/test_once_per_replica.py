"""Work that must happen once per data-parallel replica, counted per rank on gloo: at TP 2 only the replica's
source rank reads rows and decodes images (DALI's decoder, here on its CPU operators) and the other rank
receives typed tensors. Stage 2's image-header checks are split over
the ranks. The counts come from a sitecustomize that wraps the counted functions in every rank process
(test-only instrumentation; nothing in the package counts)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, child_env, write_pairs, write_stage1_shards

pytestmark = pytest.mark.slow

COUNTING = '''
import atexit, functools, json, os
_out = os.environ.get("MOCA_COUNT_DIR")
if _out and "RANK" in os.environ:
    _counts = {}

    def _wrap(owner, name, key, weight=lambda args: 1):
        original = getattr(owner, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            _counts[key] = _counts.get(key, 0) + weight(args)
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    from megatron_moca.data import dali, files, samples
    _wrap(samples.PackedBatch, "compact_inputs", "rows_built")
    _wrap(dali.DaliImageDecoder, "__call__", "images_decoded", lambda args: len(args[1]))
    _wrap(files, "image_file_problem", "image_headers_checked")

    @atexit.register
    def _write():  # child processes (loader workers, checkpoint writers) inherit RANK: one file per process
        if _counts:
            with open(os.path.join(_out, "rank%s-%d.json" % (os.environ["RANK"], os.getpid())), "w") as f:
                json.dump(_counts, f)
'''


def run_counted(tmp_path, name, args):
    site, counts = tmp_path / "site", tmp_path / f"counts_{name}"
    site.mkdir(exist_ok=True)
    counts.mkdir()
    (site / "sitecustomize.py").write_text(COUNTING)
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(site), REPO]), "MOCA_COUNT_DIR": str(counts)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "megatron_moca.cli", *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [{}, {}]
    for name in os.listdir(counts):
        rank = int(name[len("rank"):].split("-")[0])
        for key, n in json.load(open(counts / name)).items():
            per_rank[rank][key] = per_rank[rank].get(key, 0) + n
    return per_rank


def test_stage1_rows_and_images_are_built_once_per_replica(tmp_path):
    shards = write_stage1_shards(tmp_path / "shards", documents=16)
    common = ["pretrain", "--config", os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml"), f"data.paths={shards}",
              "sample.max_length=100", "data.pack_length=128", "logging.log_interval=1", "train.train_iters=2",
              "checkpoint.save_interval=100", "sample.image_pipeline=dali", "train.global_batch_size=4", "optim.lr_warmup_iters=1"]
    tp2 = run_counted(tmp_path, "tp2", [*common, f"checkpoint.save={tmp_path / 'tp2'}",
                                        "parallel.tensor_model_parallel_size=2"])
    assert tp2[0]["rows_built"] == 2 * 4 and tp2[0]["images_decoded"] > 0  # 2 steps x 4 rows, on the source
    assert tp2[1].get("rows_built", 0) == 0 and tp2[1].get("images_decoded", 0) == 0
    # (at DP 2 each rank is its replica's source and reads its half: tests/cpu/test_pretrain.py's dp2 layouts)


def test_stage2_image_headers_are_checked_once_per_job(tiny_hf_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs", text_rows=4, image_rows=6)  # six distinct pictures
    counts = run_counted(tmp_path, "s2", ["finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}",
                                          f"checkpoint.save={tmp_path / 'run'}", "model.compute_dtype=float32",
                                          "train.global_batch_size=4", "data.max_length=96", "data.num_workers=0",
                                          "data.image.min_pixels=3136", "data.image.max_pixels=6272",
                                          "train.train_iters=1", "checkpoint.save_interval=100"])
    assert [c["image_headers_checked"] for c in counts] == [3, 3]
