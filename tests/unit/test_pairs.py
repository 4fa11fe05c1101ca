"""data/pairs.py: MMEB-train tables -> pairs (stringified negative lists, image paths, caps, errors) and
the batch order (mixed / single_task, per-epoch reshuffle, data-parallel slices)."""

import ast
import json

import numpy as np
import pytest

from megatron_moca.data.pairs import BatchPlan, PairsData, PairsDataConfig
from megatron_moca.errors import UserError


def _table(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mmeb_train_rows_become_pairs(tmp_path):
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.jpg")  # only its header is read here
    _table(tmp_path / "SetA" / "train.jsonl", [
        {"qry": "<|image_1|> what is it?", "qry_image_path": "images/a.jpg", "pos_text": "a cat", "pos_image_path": "",
         "neg_text": "['a dog', 'a bird']", "neg_image_path": "['', 'images/a.jpg']"},
        {"qry": "q2", "qry_image_path": "", "pos_text": "p2", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}])
    _table(tmp_path / "SetB" / "train.jsonl", [{"qry": "q", "pos_text": "p", "neg_text": ["n1"]}] * 5)
    data = PairsData(PairsDataConfig(paths=[str(tmp_path)], max_rows_per_subset=3))
    assert data.fingerprint() == {"SetA": 2, "SetB": 3}  # SetB capped at 3 rows
    first = data.pairs[0]
    assert first.query == ("<|image_1|> what is it?", str(tmp_path / "images" / "a.jpg"))
    assert first.positive == ("a cat", None)
    assert first.negatives == [("a dog", None), ("a bird", str(tmp_path / "images" / "a.jpg"))]
    assert data.pairs[1].negatives == [] and data.pairs[2].negatives == [("n1", None)]


@pytest.mark.parametrize("row, message", [
    ({"pos_text": "p"}, "no qry column"),
    ({"qry": "q", "pos_text": "p", "neg_text": "['a', 'b']", "neg_image_path": "['x.png']"}, "2 neg_text entries but 1"),
    ({"qry": "q", "pos_text": "p", "neg_text": "['unclosed"}, "looks like a list but does not parse"),
    ({"qry": "q", "pos_text": "p", "neg_text": "__import__('os').system('true')"}, None),  # a plain string, never run
    ({"qry": "q", "qry_image_path": "../outside.png", "pos_text": "p"}, "image path '../outside.png' points outside"),
    ({"qry": "q", "qry_image_path": 7, "pos_text": "p"}, "image paths must be strings, got int"),
])
def test_bad_rows_are_named(tmp_path, row, message):
    _table(tmp_path / "Set" / "train.jsonl", [row])
    cfg = PairsDataConfig(paths=[str(tmp_path / "Set")])
    if message is None:
        assert PairsData(cfg).pairs[0].negatives == [("__import__('os').system('true')", None)]
        return
    with pytest.raises(UserError, match=message) as e:
        PairsData(cfg)
    assert "train.jsonl:1" in str(e.value)


def test_mixed_epochs_visit_every_pair_once_and_reshuffle():
    plan = BatchPlan([5, 7], global_batch=4, sampler="mixed", seed=3)
    assert plan.steps_per_epoch == 3
    epoch0 = np.concatenate([plan.global_batch_at(s) for s in range(3)])
    epoch1 = np.concatenate([plan.global_batch_at(s) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 12 and sorted(epoch0.tolist()) == list(range(12))
    assert epoch0.tolist() != epoch1.tolist()
    again = BatchPlan([5, 7], global_batch=4, sampler="mixed", seed=3)
    assert again.global_batch_at(4).tolist() == plan.global_batch_at(4).tolist()  # a pure function of the step


def test_single_task_batches_come_from_one_subset():
    sizes = [5, 9, 2]
    plan = BatchPlan(sizes, global_batch=2, sampler="single_task", seed=0)
    assert plan.steps_per_epoch == 2 + 4 + 1
    bounds = np.cumsum([0] + sizes)
    subsets_seen = set()
    for step in range(plan.steps_per_epoch):
        batch = plan.global_batch_at(step)
        owner = {int(np.searchsorted(bounds, i, side="right") - 1) for i in batch}
        assert len(owner) == 1
        subsets_seen |= owner
    assert subsets_seen == {0, 1, 2}


def test_data_parallel_slices_partition_the_global_batch():
    plan = BatchPlan([10], global_batch=6, sampler="mixed", seed=1)
    parts = [plan.local_batch_at(0, r, 3).tolist() for r in range(3)]
    assert sum(parts, []) == plan.global_batch_at(0).tolist() and all(len(p) == 2 for p in parts)


def test_batches_larger_than_the_data_are_refused():
    with pytest.raises(UserError, match="larger than any single subset"):
        BatchPlan([3, 3], global_batch=4, sampler="single_task", seed=0)
    with pytest.raises(UserError, match="data.sampler='random'"):
        BatchPlan([3], global_batch=1, sampler="random", seed=0)


def test_empty_negative_texts_follow_the_reference(tmp_path):
    """All negatives' texts empty: each takes the positive's text (its instruction, with its own image);
    some empty: an empty one takes one of the others' texts - the same one on every read (seeded)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name in ("n0", "n1", "n2"):
        Image.new("RGB", (30, 30)).save(tmp_path / "img" / f"{name}.png")
    _table(tmp_path / "Set" / "train.jsonl", [
        {"qry": "q", "pos_text": "<|image_1|>\\nRepresent the given image.", "pos_image_path": "img/n0.png",
         "neg_text": "['', '']", "neg_image_path": "['img/n1.png', 'img/n2.png']"},
        {"qry": "q2", "pos_text": "p2", "neg_text": "['', 'alpha', 'beta']"}])
    cfg = PairsDataConfig(paths=[str(tmp_path / "Set")], image_root=str(tmp_path))
    first, second = PairsData(cfg).pairs
    assert first.negatives == [("<|image_1|>\\nRepresent the given image.", str(tmp_path / "img" / "n1.png")),
                               ("<|image_1|>\\nRepresent the given image.", str(tmp_path / "img" / "n2.png"))]
    assert second.negatives[1:] == [("alpha", None), ("beta", None)] and second.negatives[0][0] in ("alpha", "beta")
    assert PairsData(cfg).pairs[1].negatives == second.negatives


def test_empty_negative_substitution_over_many_rows_is_per_row_seeded_and_never_invents_text(tmp_path):
    """40 rows, each with two empty negatives among 'alpha' / 'beta' / 'gamma' (at varying places): every empty
    one takes a text of its own row's non-empty negatives, the non-empty ones stay in place, the draws vary
    across rows (not one fixed choice), repeat on every read, and follow data.seed."""
    texts = ["alpha", "beta", "gamma"]
    rows = []
    for i in range(40):
        own = [texts[i % 3], texts[(i + 1) % 3]]
        layout = [own[0], "", own[1], ""] if i % 2 else ["", own[0], "", own[1]]
        rows.append({"qry": f"q{i}", "pos_text": f"positive {i}", "neg_text": repr(layout)})
    _table(tmp_path / "Set" / "train.jsonl", rows)

    def negatives(seed):
        return [[t for t, _ in p.negatives] for p in PairsData(PairsDataConfig(paths=[str(tmp_path / "Set")],
                                                                               seed=seed)).pairs]

    first = negatives(0)
    for i, (row, got) in enumerate(zip(rows, first)):
        given = ast.literal_eval(row["neg_text"])
        own = [t for t in given if t]
        assert len(got) == 4 and all(g == t for g, t in zip(got, given) if t), i
        assert all(g in own for g, t in zip(got, given) if not t), (i, got, own)
    filled = [g for got, row in zip(first, rows) for g, t in zip(got, ast.literal_eval(row["neg_text"])) if not t]
    assert len(set(filled)) == 3  # every text was drawn somewhere
    picks = [[g for g, t in zip(got, ast.literal_eval(row["neg_text"])) if not t] for got, row in zip(first, rows)]
    assert len({tuple(p) for p in picks}) > 2 and any(a != b for a, b in picks)  # per row and per slot
    assert negatives(0) == first and negatives(1) != first
