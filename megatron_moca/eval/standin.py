"""An offline retrieval stand-in from stage-1 shards (`moca data standin`): for each document with an
image and some text, the query is the document's text and the relevant document is its first image
(text -> image retrieval over all the stand-in's images), written in the BEIR layout of eval/beir.py.
Not a benchmark: a harness check on real data where no benchmark can be downloaded."""

from __future__ import annotations

import json
import os

from megatron_moca.errors import UserError


def build_standin(shards: str, output: str, max_queries: int = 200, query_words: int = 40) -> dict:
    from megatron_moca.data.shards import ReadError, image_ext, manifest_path, read_shard

    manifest = manifest_path(shards, "--input")
    if os.path.exists(output) and os.listdir(output):
        raise UserError(f"--output {output}: exists and is not empty; choose a new directory")
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    os.makedirs(os.path.join(output, "qrels"), exist_ok=True)
    with open(manifest) as f:
        names = [s["name"] for s in json.load(f)["shards"]]
    queries, corpus, qrels = [], [], []
    for name in names:
        for doc in read_shard(os.path.join(shards, name)):
            if isinstance(doc, ReadError) or not doc.images:
                continue
            words = " ".join(s for s in doc.segments if isinstance(s, str)).split()
            if len(words) < 5:
                continue
            n = len(queries)
            image = f"images/{n:05d}.{image_ext(doc.images[0])}"
            with open(os.path.join(output, image), "wb") as f:
                f.write(doc.images[0])
            queries.append({"_id": f"q{n}", "text": " ".join(words[:query_words])})
            corpus.append({"_id": f"d{n}", "text": "", "image": image, "source_key": doc.key})
            qrels.append(f"q{n}\td{n}\t1")
            if len(queries) >= max_queries:
                break
        if len(queries) >= max_queries:
            break
    if not queries:
        raise UserError(f"{shards}: no document with an image and at least 5 words")
    for file, rows in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        with open(os.path.join(output, file), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(output, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return {"queries": len(queries), "documents": len(corpus), "output": output}
