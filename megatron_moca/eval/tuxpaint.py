"""A held-out text -> image retrieval set from Tux Paint's stamps (`moca data evalset --name tuxpaint`).

Debian `tuxpaint-stamps-default` 2022.06.04-1 (GPL-2), fetched pinned like the demo corpus: every stamp
is an image (<name>.png, else <name>.svg) with a caption (first line of <name>.txt). The alphabet-letter
stamps are left out: 792 pairs, 707 unique captions (spec data-sources.md, "Evaluation sets"). Queries are
the unique captions; a caption shared by several stamps has them all as positives (random R@1 ~0.13%).
SVG stamps are rasterised with cairosvg (the dev extra) or, where it is missing or fails, skipped and counted.
Written in the BEIR layout with MoCa's caption -> image prompts (moca_prompts.json), so `moca eval --task
retrieval` scores it. Never part of the training data.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Tuple

from megatron_moca.errors import UserError

PACKAGE = ("tuxpaint-stamps-default", "2022.06.04-1", "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34")
STAMPS = os.path.join("usr", "share", "tuxpaint", "stamps")
# moca-method.md, "Prompts": the t2i query and the image target of MMEB-style retrieval
PROMPTS = {"query": "Find me an everyday image that matches the given caption: {text}\n",
           "image_document": "<img>Represent the given image.\n"}


def stamp_pairs(root: str) -> List[Tuple[str, str]]:
    """(image path, caption) of every non-alphabet stamp under `root`, sorted by path."""
    pairs = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "alphabets" in os.path.relpath(folder, root).split(os.sep):
            continue
        names = set(files)
        for name in sorted(files):
            if not name.endswith(".txt"):
                continue
            stem = name[:-4]
            image = next((stem + ext for ext in (".png", ".svg") if stem + ext in names), None)
            if image is None:
                continue
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                caption = f.readline().strip()
            if caption:
                pairs.append((os.path.join(folder, image), caption))
    return pairs


def build_tuxpaint(output: str, cache: str, log=print) -> Dict[str, object]:
    from megatron_moca.data.demo_corpus import fetch_packages
    from megatron_moca.eval.beir import write_beir
    from megatron_moca.eval.svg import svg_rasteriser
    from megatron_moca.ownership import staged

    (package, version), = fetch_packages(cache, log, packages=[PACKAGE],
                                         alternative="evaluate on your own BEIR-layout folder instead")
    pairs = stamp_pairs(os.path.join(cache, "extracted", package, STAMPS))
    if not pairs:
        raise UserError(f"{package}: no stamps with captions found under {STAMPS}")
    rasterise = svg_rasteriser(width=512)
    skipped = {"svg_without_cairosvg": 0, "svg_unreadable": 0}
    with staged(output, "moca data evalset") as staging:
        os.makedirs(os.path.join(staging, "images"))
        corpus, caption_ids, qrels = [], {}, []
        for path, caption in pairs:
            n = len(corpus)
            image = f"images/{n:04d}.png"
            if path.endswith(".svg"):
                png = rasterise(path) if rasterise is not None else None
                if png is None:
                    skipped["svg_without_cairosvg" if rasterise is None else "svg_unreadable"] += 1
                    continue
                with open(os.path.join(staging, image), "wb") as f:
                    f.write(png)
            else:
                shutil.copyfile(path, os.path.join(staging, image))
            corpus.append({"_id": f"d{n}", "text": "", "image": image,
                           "source": os.path.relpath(path, os.path.join(cache, "extracted", package, STAMPS))})
            query = caption_ids.setdefault(caption, f"q{len(caption_ids)}")
            qrels.append(f"{query}\td{n}\t1")
        write_beir(staging, corpus, [{"_id": qid, "text": text} for text, qid in caption_ids.items()], qrels)
        with open(os.path.join(staging, "moca_prompts.json"), "w") as f:
            json.dump(PROMPTS, f, indent=2)
        summary = {"name": "tuxpaint", "source": f"{package}={version}", "queries": len(caption_ids),
                   "documents": len(corpus), "skipped": skipped}
        with open(os.path.join(staging, "evalset.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "output": output}
