"""TP=2 and PP=2 (2 processes, gloo), TP2 x PP2 and PP=4 (4) equal TP=1/PP=1: outputs and gradients.

Each run loads the converted (TP=1-written) checkpoint at its own layout, re-saves the loaded model,
runs one forward+backward through megatron's schedule (1F1B with PP) and saves its gradients as a
dist checkpoint; the comparison reloads everything at TP=1. The TP2 x PP2 re-saved model is then
converted back to HF: bit-identical to the original folder. The same with MoCa's stage-1 joint loss
(MAE decoder on the last stage) at TP=2 and PP=2.
"""

import glob
import json
import os

import pytest
import torch
from helpers import REPO, run_moca, run_torchrun
from safetensors.torch import load_file

WORKER = os.path.join(REPO, "tests", "cpu", "parallel_worker.py")
LAYOUTS = {"ref": (1, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2pp2": (4, 2, 2), "pp4": (4, 1, 4)}


@pytest.fixture(scope="module")
def runs(tiny_mcore_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for name, (nproc, tp, pp) in LAYOUTS.items():
        out[name] = str(root / name)
        proc = run_torchrun(nproc, WORKER, "run", "--checkpoint", tiny_mcore_dir, "--out", out[name],
                            "--tp", str(tp), "--pp", str(pp))
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-4000:])
    proc = run_torchrun(1, WORKER, "compare", out["ref"], *(out[k] for k in LAYOUTS if k != "ref"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2", "pp4"])
def test_outputs_and_gradients_equal_single_process(runs, layout):
    paths, report = runs
    assert report["zero_grad_params"] == [] and report["params"] > 50
    result = report[paths[layout]]
    assert result["outputs_max_abs_diff"] <= 1e-5, result
    assert result["grad_max_rel_diff"] <= 1e-5, result


@pytest.mark.slow
def test_hf_to_tp2pp2_to_hf_is_bit_identical(runs, tiny_hf_dir, tmp_path):
    paths, _ = runs
    out = str(tmp_path / "hf")
    proc = run_moca("convert", "mcore-to-hf", "--checkpoint", os.path.join(paths["tp2pp2"], "model"),
                    "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    original = {}
    for f in glob.glob(os.path.join(tiny_hf_dir, "*.safetensors")):
        original.update(load_file(f))
    back = load_file(os.path.join(out, "model.safetensors"))
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


STAGE1_LAYOUTS = {"ref": (1, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2)}


@pytest.fixture(scope="module")
def stage1_runs(tiny_mcore_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    out = {name: str(root / name) for name in STAGE1_LAYOUTS}
    for name, (nproc, tp, pp) in STAGE1_LAYOUTS.items():
        proc = run_torchrun(nproc, WORKER, "run", "--stage1", "--checkpoint", tiny_mcore_dir, "--out", out[name],
                            "--tp", str(tp), "--pp", str(pp))
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-4000:])
    proc = run_torchrun(1, WORKER, "compare", "--stage1", out["ref"], out["tp2"], out["pp2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_stage1_loss_and_gradients_equal_single_process(stage1_runs, layout):
    """MoCa's joint loss through megatron's schedule as the last stage's loss function (MAE decoder on the
    last stage, started from LLM layer L//2 wherever that lives): loss parts and every gradient, the MAE
    decoder's included, equal TP=1/PP=1."""
    paths, report = stage1_runs
    assert report["zero_grad_params"] == [] and report["params"] > 50 and report["mae_decoder_params"] > 5
    result = report[paths[layout]]
    assert result["outputs_max_abs_diff"] <= 1e-5, result
    assert result["grad_max_rel_diff"] <= 1e-5, result
