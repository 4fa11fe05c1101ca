"""`moca finetune` (stage 2) on a tiny random Qwen2.5-VL: the run-directory contract, a release folder the
embedder loads, exact resume, GradCache and 2-process data parallelism equal to one pass, refusals."""

import json
import os

import pytest

from helpers import REPO, read_metrics, run_moca, run_torchrun, write_pairs

SMALL = ["model.compute_dtype=float32", "train.global_batch_size=4", "data.max_length=128", "data.num_workers=1",
         "data.image.min_pixels=3136", "data.image.max_pixels=12544", "logging.log_interval=1"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _finetune(tiny_hf_dir, pairs, save, *more):
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={save}", *SMALL,
                    *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _training_loss(model_dir, pairs):
    """InfoNCE (in-batch, temperature 0.03) of all training pairs' queries against their positives."""
    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.data.pairs import PairsData, PairsDataConfig
    from megatron_moca.embed.embedder import MocaEmbedder
    from megatron_moca.objectives.contrastive import info_nce
    from megatron_moca.training.contrastive_batches import side_input

    data = PairsData(PairsDataConfig(paths=[pairs]))
    embedder = MocaEmbedder(model_dir, device="cpu", max_length=128,
                            image=ImageProcessingConfig(min_pixels=3136, max_pixels=12544))
    q = embedder.embed([side_input(p.query) for p in data.pairs])
    p = embedder.embed([side_input(p.positive) for p in data.pairs])
    return info_nce(q, p)[0].item()


def test_run_directory_contract_and_a_release_that_learned(tiny_hf_dir, pairs, tmp_path):
    save = str(tmp_path / "run")
    proc = _finetune(tiny_hf_dir, pairs, save, "train.train_iters=12", "optim.lr=1e-4", "checkpoint.save_interval=5",
                     "logging.log_interval=4")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 12
    assert "24 pairs in 2 subsets, 6 steps per epoch, 12 iterations" in proc.stderr
    assert "iter 12/12 | loss" in proc.stderr and "acc" in proc.stderr
    assert sorted(os.listdir(save)) == [".megatron_moca", "config.yaml", "iter_0000005", "iter_0000010",
                                        "iter_0000012", "latest_checkpointed_iteration.txt", "metrics.jsonl",
                                        "release"] + (["tensorboard"] if os.path.isdir(os.path.join(save, "tensorboard")) else [])
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "12"
    records = read_metrics(save)
    assert [r["step"] for r in records] == [4, 8, 12]
    for key in ("loss", "contrastive_loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu",
                "tflops_per_gpu", "mfu", "mem_gib", "data_wait_frac"):
        assert key in records[-1], key
    assert records[-1]["tokens_per_s"] > 0 and records[-1]["tflops_per_gpu"] > 0
    assert {"optimizer.pt", "rng_rank0.pt", "trainer_state.json", "config.json"} <= set(os.listdir(
        os.path.join(save, "iter_0000012")))
    release = os.path.join(save, "release")
    config = json.load(open(os.path.join(release, "config.json")))
    assert config["torch_dtype"] == "float32"  # the start's dtype
    # bidirectional where transformers and vLLM read it, in a text_config complete enough to build the model
    assert config["is_causal"] is False and config["text_config"]["is_causal"] is False
    assert config["text_config"]["hidden_size"] == config["hidden_size"] and "auto_map" not in config
    assert _training_loss(release, pairs) < _training_loss(tiny_hf_dir, pairs) - 0.1
    # the release says how it was trained to embed: the run's image bounds replace the base's (200704..802816)
    processor = json.load(open(os.path.join(release, "preprocessor_config.json")))
    assert (processor["min_pixels"], processor["max_pixels"]) == (3136, 12544)
    assert processor["size"] == {"shortest_edge": 3136, "longest_edge": 12544}
    assert json.load(open(os.path.join(release, "moca_embedding.json"))) == {
        "attention": "bidirectional", "pooling": "mean", "normalize": True, "max_length": 128, "min_pixels": 3136,
        "max_pixels": 12544}
    from megatron_moca.embed.embedder import MocaEmbedder

    embedder = MocaEmbedder(release, device="cpu")  # takes them by default
    assert embedder.inputs.builder.cfg.max_length == 128
    assert (embedder.inputs.builder.cfg.image.min_pixels, embedder.inputs.builder.cfg.image.max_pixels) == (3136, 12544)
    # the model card: what the run did, then the scores `moca eval --output` measures on the release
    training = json.load(open(os.path.join(release, "moca_training.json")))
    assert (training["steps"], training["global_batch_size"], training["data"]["subsets"]) == \
        (12, 4, {"ImagePairs": 12, "TextPairs": 12})
    assert training["consumed_tokens"] == records[-1]["consumed_tokens"] > 0
    assert training["hyperparameters"]["lr"] == 1e-4 and training["hyperparameters"]["temperature"] == 0.03
    card = open(os.path.join(release, "README.md")).read()
    assert "library_name: sentence-transformers" in card and "| steps | 12 |" in card and "Not evaluated yet" in card
    from megatron_moca.eval.beir import write_beir

    data = str(tmp_path / "set")
    write_beir(data, [{"_id": "d1", "text": "a harbour"}, {"_id": "d2", "text": "a mountain"}],
               [{"_id": "q1", "text": "harbour"}], ["q1\td1\t1"])
    proc = run_moca("eval", "--model", release, "--task", "retrieval", "--data", data, "--output", str(tmp_path / "res"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    card = open(os.path.join(release, "README.md")).read()
    assert f"**retrieval** on `{data}`" in card and f"| ndcg@10 | {metrics['ndcg@10']:.4f} |" in card
    assert json.load(open(os.path.join(release, "moca_results.json")))[0]["metrics"] == metrics
    # the prompts the scores were measured with go with them (the retrieval task's: no moca_prompts.json here)
    assert metrics["prompts"] == {"query": "{text}", "document": "{text}",
                                  "image_document": "<img>\nRepresent the given document image."}
    assert "Prompts:\n\n- prompts/query: `{text}`\n- prompts/document: `{text}`\n" \
           "- prompts/image_document: `<img>\\nRepresent the given document image.`" in card


def test_an_interrupted_run_resumes_exactly(tiny_hf_dir, pairs, tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    common = ["train.train_iters=7", "optim.lr=2e-4", "checkpoint.save_interval=3"]
    _finetune(tiny_hf_dir, pairs, straight, *common)
    _finetune(tiny_hf_dir, pairs, stopped, *common, "train.exit_interval=4")
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3, 4]
    from megatron_moca.ownership import mark

    cut = os.path.join(stopped, "iter_0000006.partial")  # a save cut short by a kill (ours): ignored, replaced
    os.makedirs(cut)
    mark(cut, "moca finetune")
    resumed = _finetune(tiny_hf_dir, pairs, stopped, *common)
    assert "resumed from" in resumed.stderr and "iter_0000004" in resumed.stderr
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["consumed_tokens"]) for r in a] == \
        [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["consumed_tokens"]) for r in b]
    assert not os.path.exists(os.path.join(stopped, "iter_0000006.partial"))


def test_grad_cache_and_two_data_parallel_ranks_equal_one_pass(tiny_hf_dir, pairs, tmp_path):
    """GradCache chunks of one input, and 2 gloo processes with the AdamW state sharded over them (ZeRO-1),
    stopped after step 2 and resumed: the same losses and gradient norms as one pass in one process."""
    common = ["train.train_iters=3", "optim.lr=2e-4", "checkpoint.save_interval=100"]
    one, chunked, dp2 = (str(tmp_path / n) for n in ("one", "chunked", "dp2"))
    _finetune(tiny_hf_dir, pairs, one, *common)
    _finetune(tiny_hf_dir, pairs, chunked, *common, "train.micro_batch_size=1")
    for more in (["train.exit_interval=2"], []):
        proc = run_torchrun(2, os.path.join(REPO, "megatron_moca", "cli.py"), "finetune", f"model.path={tiny_hf_dir}",
                            f"data.paths={pairs}", f"checkpoint.save={dp2}", *SMALL, *common, *more)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"optimizer_rank0.pt", "optimizer_rank1.pt"} <= set(os.listdir(os.path.join(dp2, "iter_0000002")))
    base = read_metrics(one)
    for other in (read_metrics(chunked), read_metrics(dp2)):
        assert len(other) == len(base) == 3
        for x, y in zip(base, other):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
            assert y["accuracy"] == x["accuracy"]


def test_bad_settings_and_changed_resumes_are_refused(tiny_hf_dir, pairs, tmp_path):
    proc = run_moca("finetune", f"model.path={tmp_path / 'nope'}", f"data.paths={pairs}", f"checkpoint.save={tmp_path}")
    assert proc.returncode == 2 and "nope: not a directory" in proc.stderr
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={tmp_path}",
                    "data.sampler=by_task")
    assert proc.returncode == 2 and "data.sampler='by_task': expected one of mixed, single_task" in proc.stderr
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={tmp_path}",
                    "train.global_batch_size=64")
    assert proc.returncode == 2 and "larger than all subsets together (24 pairs)" in proc.stderr
    save = str(tmp_path / "run")
    _finetune(tiny_hf_dir, pairs, save, "train.train_iters=2", "train.exit_interval=1")
    before = {name: open(os.path.join(save, name)).read() for name in ("config.yaml", "metrics.jsonl")}
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={save}", *SMALL,
                    "train.train_iters=2", "train.global_batch_size=2")
    assert proc.returncode == 2 and "global_batch_size was 4 and is now 2" in proc.stderr
    assert {name: open(os.path.join(save, name)).read() for name in before} == before
    assert sorted(os.listdir(save)) == [".megatron_moca", "config.yaml", "iter_0000001",
                                        "latest_checkpointed_iteration.txt", "metrics.jsonl"] + \
        (["tensorboard"] if os.path.isdir(os.path.join(save, "tensorboard")) else [])
