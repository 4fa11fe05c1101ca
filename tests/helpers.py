"""Helpers shared by the tests: tiny configs, the moca CLI and torchrun in subprocesses, HF models."""

import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_moca.conversion.hf_config import hf_config_from_model
from megatron_moca.conversion.mapping import normalize_hf_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env():
    """The environment for child processes: no torch.distributed variables of this process."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def run_moca(*args, timeout=600, env=None):
    """Run the `moca` CLI in a fresh process (dist-checkpoint saves spawn workers); env: more variables."""
    env = {**child_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "megatron_moca.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def run_torchrun(nproc, script, *args, timeout=600):
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def kill_when(args, ready, timeout=300):
    """Start `moca *args`, SIGKILL it once ready() holds; returns the helper processes it had then."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "megatron_moca.cli", *args], env=child_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helpers, deadline = {}, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            helpers.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            break
        if ready():
            helpers.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(60) == -signal.SIGKILL, "the command ended before it could be killed"
    return list(helpers.values())


def assert_helpers_gone(helpers, within=5.0):
    """Every process in `helpers` (psutil.Process) has exited within `within` seconds."""
    import time

    import psutil

    deadline = time.time() + within
    alive = helpers
    while time.time() < deadline:
        alive = [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"still running {within} s after the kill: {[_command(p) for p in alive]}")


def _command(process):
    import psutil

    try:
        return " ".join(process.cmdline())[-120:]
    except psutil.Error:  # it ended (or became a zombie) while the message was written
        return f"pid {process.pid}"


def tiny_config(**language):
    from megatron_moca.config.model import preset

    cfg = preset("tiny")
    for k, v in language.items():
        setattr(cfg.language, k, v)
    return cfg


def hf_model(cfg, seed=0):
    """A random transformers Qwen2_5_VLForConditionalGeneration with cfg's shapes (fp32, sdpa)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = Qwen2_5_VLConfig(**hf_config_from_model(cfg, "float32"))
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zero: perturb so the mapping is tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from_hf(cfg, hf):
    from megatron_moca.conversion.weights import load_hf_into_model
    from megatron_moca.models.vlm import MocaVLM

    state = {normalize_hf_key(k): v for k, v in hf.state_dict().items()}
    model = MocaVLM(cfg).eval()
    load_hf_into_model(model, lambda k: state[k], cfg)
    return model


def build_batch(cfg, rows, seed=0):
    """rows: list of lists of image grids (t, h, w) per row (empty = text-only). Right padding.

    Returns ids [b, s], attention mask [b, s], pixel rows, image_grid_thw (or None).
    """
    g = torch.Generator().manual_seed(seed)
    tok, merge = cfg.tokens, cfg.vision.merge_unit
    seqs, grids = [], []
    for r, images in enumerate(rows):
        seq = torch.randint(0, 150000, (3 + r,), generator=g).tolist()
        for grid in images:
            n = grid[0] * grid[1] * grid[2] // merge
            seq += [tok.vision_start_token_id] + [tok.image_token_id] * n + [tok.vision_end_token_id]
            seq += torch.randint(0, 150000, (4,), generator=g).tolist()
            grids.append(grid)
        seqs.append(seq)
    s = max(len(x) for x in seqs)
    ids = torch.full((len(rows), s), tok.pad_token_id)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
    if not grids:
        return ids, mask, None, None
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=g)
    return ids, mask, pixels, grid


def stage1_targets(cfg, ids, valid, seed=0):
    """Stage-1 targets for a build_batch batch: MLM labels (p 0.4 on valid non-image tokens), the noised
    image tokens (p 0.5) and random MAE targets for them."""
    from megatron_moca.objectives.masking import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    image = ids == cfg.tokens.image_token_id
    labels = torch.where(~image & valid & (torch.rand(ids.shape, generator=g) < 0.4), ids, IGNORE_INDEX)
    mae = image & (torch.rand(ids.shape, generator=g) < 0.5)
    targets = torch.randn(int(mae.sum()), cfg.vision.merge_unit * cfg.vision.patch_dim, generator=g)
    return {"labels": labels, "mae_token_mask": mae, "mae_targets": targets}


def packed_real_row(max_length, pack_length):
    """One packed stage-1 row (PackedBatch) of real documents, as the loader gives it: two with a
    scikit-image picture each, then one text-only; CPU image pipeline."""
    import glob

    import numpy as np
    import skimage

    from megatron_moca.data.documents import PLACEHOLDER, from_record
    from megatron_moca.data.samples import GreedyPacker, Stage1SampleBuilder, Stage1SampleConfig
    from megatron_moca.data.tokenizer import QwenTokenizer

    images = sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.png")))[:2]
    tok = QwenTokenizer()
    builder = Stage1SampleBuilder(tok, Stage1SampleConfig(max_length=max_length, image_pipeline="cpu"))
    docs = [from_record({"text": f"Figure {i}: {PLACEHOLDER} shows a test image. ", "images": [images[i]]},
                        f"doc{i}") for i in range(2)] + [from_record({"text": "plain text " * 30}, "doc2")]
    packer = GreedyPacker(length=pack_length, pad_id=tok.pad_id, pad_to_multiple=16)
    for i, d in enumerate(docs):
        assert packer.add(builder.build(d, np.random.default_rng(i))) is None
    return packer.flush()


def two_documents_in_row0(cfg, ids, mask):
    """Document ids for build_batch output: row 0 split into two documents after its last image."""
    doc = torch.where(mask.bool(), 0, -1)
    cut = int((ids[0] == cfg.tokens.image_token_id).nonzero().max()) + 2
    doc[0, cut:] = torch.where(doc[0, cut:] >= 0, 1, -1)
    return doc


def hidden_and_grads(model, ids, pixels, grid, **kw):
    """One forward + backward of a simple loss: the hidden states and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    hidden = model(ids, pixel_values=pixels, image_grid_thw=grid, **kw)
    hidden.float().pow(2).mean().backward()
    return hidden.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class OpNames(TorchDispatchMode):
    """Records the aten op names dispatched inside the `with` block (below autograd)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def write_stage1_shards(folder, documents=40, per_shard=16, pictures=None):
    """A stage-1 shard folder: two in three documents open with a picture followed by ~150 words, the
    rest are text only; with sample.max_length=100 and data.pack_length=128 every packed row then holds
    exactly one document (so runs with different data-parallel sizes see the same global batches).
    pictures: encoded images to use (default: the real photographs shipped in scikit-image)."""
    import glob
    import json

    from megatron_moca.data.documents import Document
    from megatron_moca.data.shards import MANIFEST, ShardWriter

    if pictures is None:
        import skimage

        paths = sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.png")), key=os.path.getsize)
        pictures = [open(p, "rb").read() for p in paths[:6]]
    data = pictures
    words = ("a photograph of an everyday scene with people and objects taken outdoors on a bright "
             "afternoon near the old harbour").split()
    writer = ShardWriter(str(folder), max_shard_bytes=1 << 40, max_shard_samples=per_shard)
    for i in range(documents):
        text = " ".join(words[(i * j + j) % len(words)] for j in range(150 + i % 20))
        writer.write(Document(f"doc{i:03d}", [0, text], [data[i % len(data)]]) if i % 3
                     else Document(f"doc{i:03d}", [text], []))
    shards = writer.close()
    with open(os.path.join(str(folder), MANIFEST), "w") as f:
        json.dump({"shards": [vars(s) for s in shards]}, f)
    return str(folder)


def write_pairs(folder, text_rows=12, image_rows=12):
    """Stage-2 pairs in the MMEB-train layout: <folder>/TextPairs/train.jsonl (text only, hard negatives as
    a stringified list, as MMEB-train writes them) and <folder>/ImagePairs/train.jsonl (caption -> one of
    six real photographs, one hard-negative image), images under <folder>/images/."""
    import glob
    import json
    import shutil

    import skimage

    folder = str(folder)
    pictures = sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.png")), key=os.path.getsize)[:6]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    names = []
    for i, path in enumerate(pictures):
        names.append(f"images/p{i}.png")
        shutil.copy(path, os.path.join(folder, names[-1]))
    topics = ["harbour", "mountain", "forest", "desert", "river", "market", "castle", "garden", "bridge", "island",
              "village", "station"]
    text, image = [], []
    for i in range(text_rows):
        t = topics[i % len(topics)]
        text.append({"qry": f"Retrieve a passage about the {t} {i}", "qry_image_path": "",
                     "pos_text": f"A passage describing the {t} {i} in some detail.", "pos_image_path": "",
                     "neg_text": repr([f"A passage about the {topics[(i + 1) % len(topics)]}", "Another passage"]),
                     "neg_image_path": repr(["", ""])})
    for i in range(image_rows):
        image.append({"qry": f"Find me an everyday image that matches the given caption: picture {i % 6}",
                      "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.",
                      "pos_image_path": names[i % 6], "neg_text": ["<|image_1|>\nRepresent the given image."],
                      "neg_image_path": [names[(i + 1) % 6]]})
    for subset, rows in (("TextPairs", text), ("ImagePairs", image)):
        os.makedirs(os.path.join(folder, subset), exist_ok=True)
        with open(os.path.join(folder, subset, "train.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def synthetic_pictures():
    """Three PNGs drawn with Pillow (the card may lack scikit-image's sample photographs)."""
    import io

    from PIL import Image, ImageDraw

    out = []
    for i, size in enumerate([(160, 120), (96, 200), (224, 224)]):
        image = Image.new("RGB", size, (30 * i, 90, 160))
        draw = ImageDraw.Draw(image)
        for k in range(0, size[0], 16):
            draw.line([(k, 0), (size[0] - k, size[1])], fill=(255 - 40 * i, 20 * k % 255, 60), width=3)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def tiny_finetune_args(hf, pairs):
    """`moca finetune` on the tiny model and write_pairs tables, small enough for a test (add the iterations,
    the save interval and checkpoint.save)."""
    return ["finetune", f"model.path={hf}", f"data.paths={pairs}", "model.compute_dtype=float32",
            "train.global_batch_size=4", "data.max_length=96", "data.num_workers=1", "data.image.min_pixels=3136",
            "data.image.max_pixels=6272", "optim.lr=1e-4", "logging.log_interval=1"]


def stopped_and_resumed(args, save, stop_at):
    """Run `moca *args` to train.exit_interval=stop_at, rerun it to the end (an automatic resume), and
    return the run's metrics.jsonl records."""
    first = run_moca(*args, f"train.exit_interval={stop_at}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_moca(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    return read_metrics(save)


def read_metrics(save):
    """The records of a run directory's metrics.jsonl."""
    import json

    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_token_cross_entropy(logits, labels, weights, loss_tol, grad_rtol, grad_atol, loss_fn=None):
    """loss_fn (default objectives/losses.token_cross_entropy) vs F.cross_entropy on fp32 logits: per-token
    loss, and the gradient (in the logits' dtype) of the weighted sum; IGNORE_INDEX rows get a zero gradient."""
    import torch.nn.functional as F

    from megatron_moca.objectives.losses import token_cross_entropy
    from megatron_moca.objectives.masking import IGNORE_INDEX

    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = (loss_fn or token_cross_entropy)(a, labels)
    ref = F.cross_entropy(b.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=loss_tol, atol=10 * loss_tol)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert a.grad.dtype == logits.dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=grad_rtol, atol=grad_atol)
    assert a.grad[labels == IGNORE_INDEX].abs().sum() == 0


def trec_eval_means(run_file, qrels_file, **cut_offs):
    """pytrec_eval's means over the queries of a TREC run file and a BEIR qrels .tsv (header line first),
    keyed as our metrics are: trec_eval_means(run, qrels, ndcg=10, recall=10) -> {"ndcg@10": ..., ...}."""
    import pytrec_eval
    run, judged = {}, {}
    for line in open(run_file).read().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    for line in open(qrels_file).read().splitlines()[1:]:
        if line:
            qid, doc, grade = line.split("\t")
            judged.setdefault(qid, {})[doc] = int(grade)
    names = {"ndcg": "ndcg_cut", "recall": "recall"}
    per_query = pytrec_eval.RelevanceEvaluator(judged, {f"{names[m]}.{k}" for m, k in cut_offs.items()}).evaluate(run)
    return {f"{m}@{k}": sum(v[f"{names[m]}_{k}"] for v in per_query.values()) / len(per_query)
            for m, k in cut_offs.items()} | {"queries": len(per_query)}


def pytrec_means(scores, query_ids, doc_ids, qrels, k):
    """pytrec_eval's per-query ndcg_cut_k / recall_k and recip_rank over the top k, averaged as BEIR does."""
    import pytrec_eval  # the dev extra installs it: a missing reference is a failure, not a skip
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(doc_ids)} for i, q in enumerate(query_ids)}
    evaluator = pytrec_eval.RelevanceEvaluator({q: {d: int(g) for d, g in j.items()} for q, j in qrels.items()},
                                               {f"ndcg_cut.{k}", f"recall.{k}"})
    full = evaluator.evaluate(run)
    from megatron_moca.eval.metrics import rankings

    order = rankings(scores, doc_ids, k)
    top = {q: {doc_ids[d]: float(scores[i, d]) for d in order[i]} for i, q in enumerate(query_ids)}
    rr = pytrec_eval.RelevanceEvaluator({q: {d: int(g) for d, g in j.items()} for q, j in qrels.items()},
                                        {"recip_rank"}).evaluate(top)
    n = len(full)
    return {f"ndcg@{k}": sum(v[f"ndcg_cut_{k}"] for v in full.values()) / n,
            f"recall@{k}": sum(v[f"recall_{k}"] for v in full.values()) / n,
            f"mrr@{k}": sum(v["recip_rank"] for v in rr.values()) / n, "queries": n}
