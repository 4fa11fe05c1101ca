"""Stage-1 sample building on real documents: masking statistics, targets, truncation, packing."""

import numpy as np
import pytest
import torch

from megatron_moca.data.documents import PLACEHOLDER, DocumentError, from_record
from megatron_moca.data.image_processing import process_image
from megatron_moca.data.samples import GreedyPacker, Stage1SampleBuilder, Stage1SampleConfig, pack
from megatron_moca.models.rope_index import get_rope_index
from megatron_moca.objectives.masking import IGNORE_INDEX, mlm_mask

LONG_TEXT = ("The camera man stands in a field holding an old camera on a tripod while clouds drift above. " * 12)


def doc(real_images, n_images=2, text=LONG_TEXT, key="d"):
    body = text + "".join(f" {PLACEHOLDER} caption {i}. " + text for i in range(n_images))
    return from_record({"text": body, "images": real_images[:n_images]}, key)


def test_mlm_rate_and_specials(real_images, tokenizer):
    builder = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=8192, image_pipeline="cpu"))
    masked = maskable = 0
    for seed in range(8):
        s = builder.build(doc(real_images, 3), np.random.default_rng(seed))
        special = np.isin(s.labels, list(tokenizer.special_ids))
        assert not special.any()  # no special or image token is ever a target
        hit = s.labels != IGNORE_INDEX
        assert (s.input_ids[hit] == tokenizer.mask_id).all()
        assert (s.input_ids[~hit] != tokenizer.mask_id).all()
        original = np.where(hit, s.labels, s.input_ids)
        assert (original[np.isin(original, list(tokenizer.special_ids))] != tokenizer.mask_id).all()
        maskable += int((~np.isin(original, list(tokenizer.special_ids))).sum())
        masked += int(hit.sum())
    rate, sigma = masked / maskable, (0.4 * 0.6 / maskable) ** 0.5
    assert abs(rate - 0.4) < 5 * sigma, rate


def test_mae_targets_are_the_clean_pixels_of_masked_groups(real_images, tokenizer):
    builder = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=8192, image_pipeline="cpu"))
    d = doc(real_images, 2)
    s = builder.build(d, np.random.default_rng(1))
    clean = np.concatenate([process_image(d.images[i])[0] for i in range(2)])  # HF-identical float rows
    groups = s.mae_token_mask[s.input_ids == tokenizer.image_pad_id]
    assert groups.shape[0] * 4 == clean.shape[0]
    rate, sigma = groups.mean(), (0.25 / groups.shape[0]) ** 0.5
    assert abs(rate - 0.5) < 5 * sigma
    assert not s.mae_token_mask[s.input_ids != tokenizer.image_pad_id].any()
    batch = pack([s], len(s), tokenizer.pad_id).model_inputs()
    rows = np.repeat(groups, 4)
    assert np.array_equal(batch["mae_targets"].numpy().reshape(-1, 1176), clean[rows])
    noised = batch["pixel_values"].numpy()
    assert np.array_equal(noised[~rows], clean[~rows])
    assert (noised[rows] == s.mae_noise).all()  # one shared noise vector for the document
    assert not np.allclose(s.mae_noise, clean[rows][0])


def test_device_pixels_equal_the_processor(real_images):
    from megatron_moca.data.image_processing import image_frames
    from megatron_moca.data.pixels import frames_to_pixels

    for path in real_images[:6]:
        data = open(path, "rb").read()
        frames, _ = image_frames(data)
        assert frames.dtype == np.uint8 and frames.shape[1] == 588
        assert np.array_equal(frames_to_pixels(torch.from_numpy(frames)).numpy(), process_image(data)[0])


def test_truncation_drops_a_cut_image_whole(real_images, tokenizer):
    full = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=100000, image_pipeline="cpu")).build(doc(real_images, 2),
                                                                                       np.random.default_rng(0))
    image_pad = tokenizer.image_pad_id
    first_image_end = int(np.nonzero(full.input_ids == tokenizer.vision_end_id)[0][0]) + 1
    cut = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=first_image_end + 50, image_pipeline="cpu"))
    s = cut.build(doc(real_images, 2), np.random.default_rng(0))
    assert len(s) <= first_image_end + 50
    assert s.image_grid_thw.shape[0] == 1  # the second image did not fit and was dropped whole
    assert int((s.input_ids == image_pad).sum()) * 4 == s.pixel_frames.shape[0]
    assert (s.input_ids == tokenizer.vision_start_id).sum() == (s.input_ids == tokenizer.vision_end_id).sum() == 1


def test_positions_are_the_rope_index_of_the_document(real_images, tokenizer):
    s = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(image_pipeline="cpu")).build(doc(real_images, 2), np.random.default_rng(0))
    original = np.where(s.labels != IGNORE_INDEX, s.labels, s.input_ids)
    ref, _ = get_rope_index(torch.from_numpy(original)[None], torch.from_numpy(s.image_grid_thw))
    assert np.array_equal(s.position_ids, ref[:, 0].numpy())


def test_packing_keeps_boundaries_and_alignment(real_images, tokenizer):
    builder = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=700, image_pipeline="cpu"))
    samples = [builder.build(doc(real_images[i:], 1, text="short text " * (5 + i), key=f"k{i}"),
                             np.random.default_rng(i)) for i in range(5)]
    packer = GreedyPacker(length=1500, pad_id=tokenizer.pad_id, pad_to_multiple=16)
    rows = [r for r in (packer.add(s) for s in samples) if r is not None] + [packer.flush()]
    assert sum(len(r.keys) for r in rows) == 5
    seen = 0
    for row in rows:
        assert row.input_ids.shape[1] % 16 == 0
        docs = row.document_ids[0]
        start = 0
        for i, key in enumerate(row.keys):
            s = samples[seen + i]
            n = len(s)
            assert (docs[start:start + n] == i).all()
            assert torch.equal(row.input_ids[0, start:start + n], torch.from_numpy(s.input_ids))
            assert torch.equal(row.position_ids[:, 0, start:start + n], torch.from_numpy(s.position_ids))
            start += n
        assert (docs[start:] == -1).all() and (row.labels[0, start:] == IGNORE_INDEX).all()
        assert row.pixel_frames.shape[0] == int(row.image_grid_thw.prod(-1).sum())
        inputs = row.model_inputs()
        assert inputs["mae_targets"].shape[0] == int(row.mae_token_mask.sum())
        assert inputs["pixel_values"].shape == (row.pixel_frames.shape[0], 1176)
        seen += len(row.keys)
    with pytest.raises(ValueError, match="do not fit"):
        pack(samples, 10, tokenizer.pad_id)


def test_mlm_mask_is_deterministic_given_the_generator():
    ids = np.arange(1000)
    a = mlm_mask(ids, [5, 6], 999999, 0.4, np.random.default_rng(3))
    b = mlm_mask(ids, [5, 6], 999999, 0.4, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_stray_vision_tokens_in_text_are_refused(real_images, tokenizer):
    d = from_record({"text": "text with a stray <|image_pad|> token"}, "k")
    with pytest.raises(DocumentError, match="vision special tokens"):
        Stage1SampleBuilder(tokenizer, Stage1SampleConfig(image_pipeline="cpu")).build(d, np.random.default_rng(0))


def test_bad_documents_are_refused_with_reasons(real_images):
    cases = [({"text": f"{PLACEHOLDER}{PLACEHOLDER}", "images": real_images[:1]}, "more image placeholders"),
             ({"text": f"a {PLACEHOLDER}", "images": [None]}, "image bytes missing"),
             ({"text": "", "images": []}, "zero-length text"),
             ({"texts": ["a", None], "images": [None]}, "differ in length"),
             ({"nothing": 1}, "neither 'text'")]
    for record, reason in cases:
        with pytest.raises(DocumentError, match=reason):
            from_record(record, "k")


@pytest.mark.parametrize("pipeline", ["cpu", "device_resize", "dali"])
def test_an_image_cut_by_the_budget_is_never_decoded(real_images, tokenizer, monkeypatch, pipeline):
    """Whether an image fits comes from its header: the second image here does not fit, and its body
    (truncated to garbage after a valid header) is never decoded, so the document is kept."""
    from megatron_moca.data import image_processing

    full = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=100000, image_pipeline="cpu")).build(
        doc(real_images, 2), np.random.default_rng(0))
    first_image_end = int(np.nonzero(full.input_ids == tokenizer.vision_end_id)[0][0]) + 1
    with open(real_images[1], "rb") as f:
        second = f.read()
    images = [real_images[0], second[:len(second) // 3]]  # the second: header intact, pixel data cut
    body = LONG_TEXT + "".join(f" {PLACEHOLDER} caption {i}. " + LONG_TEXT for i in range(2))
    truncated_doc = from_record({"text": body, "images": images}, "t")
    decoded = []
    original = image_processing.decode_image
    monkeypatch.setattr(image_processing, "decode_image", lambda data, cfg=None: decoded.append(1) or original(data, cfg))
    builder = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=first_image_end + 50, image_pipeline=pipeline))
    s = builder.build(truncated_doc, np.random.default_rng(0))
    assert s.image_grid_thw.shape[0] == 1
    assert len(decoded) == (0 if pipeline == "dali" else 1)  # only the image that fits
    with pytest.raises(DocumentError, match="image 1"):  # with room for it, the cut body is found
        Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=100000, image_pipeline="cpu")).build(
            truncated_doc, np.random.default_rng(0))


@pytest.mark.parametrize("mlm, mae", [(0.15, 0.2), (0.7, 0.85)])
def test_masking_rates_follow_non_default_probabilities(mlm, mae, real_images, tokenizer):
    """At p = 0.5 a rate of 1 - p passes too: check both maskings where p and 1 - p differ, set from the config."""
    builder = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(max_length=8192, image_pipeline="cpu",
                                                                mlm_probability=mlm, mae_probability=mae))
    masked = maskable = groups = noised = 0
    for seed in range(6):
        s = builder.build(doc(real_images, 3), np.random.default_rng(seed))
        hit = s.labels != IGNORE_INDEX
        original = np.where(hit, s.labels, s.input_ids)
        maskable += int((~np.isin(original, list(tokenizer.special_ids))).sum())
        masked += int(hit.sum())
        image_tokens = s.mae_token_mask[s.input_ids == tokenizer.image_pad_id]
        groups += image_tokens.shape[0]
        noised += int(image_tokens.sum())
    assert abs(masked / maskable - mlm) < 5 * (mlm * (1 - mlm) / maskable) ** 0.5, masked / maskable
    assert abs(noised / groups - mae) < 5 * (mae * (1 - mae) / groups) ** 0.5, noised / groups
