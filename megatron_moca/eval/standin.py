"""An offline retrieval stand-in from stage-1 shards (`moca data standin`): for each document with an
image and some text, the query is the document's text and the relevant document is its first image
(text -> image retrieval over all the stand-in's images), written in the BEIR layout of eval/beir.py;
the documents are taken evenly spread over the shards. With train_pairs, other documents become stage-2 training pairs in the
MMEB-train layout (train/DemoPairs/train.jsonl, images in train/images/), each with the next pair's
image as its hard negative: the same task, on held-out documents. Not a benchmark: a harness check on
real data where no benchmark can be downloaded."""

from __future__ import annotations

import json
import os
from typing import Iterator, Tuple

from megatron_moca.errors import UserError

# the prompts `moca eval --task retrieval` embeds with (eval.retrieval.TASK_PROMPTS), in MMEB's notation
DOCUMENT_PROMPT = "<|image_1|>\nRepresent the given document image."


def _text_image_documents(shards: str, query_words: int) -> Iterator[Tuple[str, str, bytes]]:
    """(key, first query_words words, first image) of each document with an image and >= 5 words."""
    from megatron_moca.data.shards import ReadError, manifest_path, read_shard

    with open(manifest_path(shards, "--input")) as f:
        names = [s["name"] for s in json.load(f)["shards"]]
    for name in names:
        for doc in read_shard(os.path.join(shards, name)):
            if isinstance(doc, ReadError) or not doc.images:
                continue
            words = " ".join(s for s in doc.segments if isinstance(s, str)).split()
            if len(words) >= 5:
                yield doc.key, " ".join(words[:query_words]), doc.images[0]


def build_standin(shards: str, output: str, max_queries: int = 200, query_words: int = 40,
                  train_pairs: int = 0) -> dict:
    from megatron_moca.data.shards import manifest_path
    from megatron_moca.ownership import staged

    manifest_path(shards, "--input")
    with staged(output, "moca data standin") as staging:  # renamed onto --output when complete
        counts = _write_standin(shards, staging, max_queries, query_words, train_pairs)
    return {**counts, "output": output}


def _write_standin(shards: str, output: str, max_queries: int, query_words: int, train_pairs: int) -> dict:
    from megatron_moca.data.shards import image_ext
    from megatron_moca.eval.beir import write_beir, write_jsonl

    os.makedirs(os.path.join(output, "images"))
    # evaluation documents spread evenly over the shards (so over the corpus's sources), training pairs
    # spread evenly over the rest
    eligible = sum(1 for _ in _text_image_documents(shards, query_words))
    if train_pairs:  # leave at least half of the documents for training
        max_queries = min(max_queries, eligible // 2)
    eval_every = max(1, eligible // max(max_queries, 1))
    n_eval = min(max_queries, -(-eligible // eval_every))
    train_every = max(1, (eligible - n_eval) // max(train_pairs, 1))
    queries, corpus, qrels, pairs = [], [], [], []
    rest = 0
    for i, (key, text, image) in enumerate(_text_image_documents(shards, query_words)):
        if i % eval_every == 0 and len(queries) < max_queries:
            n = len(queries)
            path = f"images/{n:05d}.{image_ext(image)}"
            queries.append({"_id": f"q{n}", "text": text})
            corpus.append({"_id": f"d{n}", "text": "", "image": path, "source_key": key})
            qrels.append(f"q{n}\td{n}\t1")
        else:
            rest += 1
            if (rest - 1) % train_every or len(pairs) >= train_pairs:
                continue
            path = f"train/images/{len(pairs):05d}.{image_ext(image)}"
            os.makedirs(os.path.join(output, "train", "images"), exist_ok=True)
            pairs.append({"qry": text, "qry_image_path": "", "pos_text": DOCUMENT_PROMPT,
                          "pos_image_path": path[len("train/"):], "source_key": key})
        with open(os.path.join(output, path), "wb") as f:
            f.write(image)
    if not queries:
        raise UserError(f"{shards}: no document with an image and at least 5 words")
    write_beir(output, corpus, queries, qrels)
    if pairs:
        for i, row in enumerate(pairs):
            row.update(neg_text=[DOCUMENT_PROMPT], neg_image_path=[pairs[(i + 1) % len(pairs)]["pos_image_path"]])
        os.makedirs(os.path.join(output, "train", "DemoPairs"))
        write_jsonl(os.path.join(output, "train", "DemoPairs", "train.jsonl"), pairs)
    return {"queries": len(queries), "documents": len(corpus), "train_pairs": len(pairs)}
