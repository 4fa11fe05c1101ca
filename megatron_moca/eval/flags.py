"""Zero-shot flag classification in the MMEB layout (`moca data evalset --name flags`).

npm `flag-icons` 7.5.0 (MIT; spec data-sources.md, "Evaluation sets"), fetched with `npm pack` and checked
against its pinned sha256: 271 countries and regions (country.json) with 4x3 SVG flags. One MMEB subset,
CountryFlags: the query is a flag image with MMEB's classification instruction, the candidates are the
271 names with the right one first (hit@1 = the right name ranks first; chance 1/271). Written as MMEB-eval
lays its data out (CountryFlags/test.jsonl + eval_images/), so `moca eval --task mmeb` scores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from typing import Dict

from megatron_moca.errors import UserError

PACKAGE = ("flag-icons", "7.5.0", "c0b80bf0e08006a60f56621d6bc49f8c7131f4d1fef6737a165a673431f4b518")
SUBSET = "CountryFlags"
QUERY = "<|image_1|> Represent the given image for classification\n"  # MMEB's classification instruction


def fetch_npm_tarball(cache: str, log=print) -> str:
    """The pinned package's .tgz in `cache` (downloaded with `npm pack` once), checksum-verified."""
    name, version, sha = PACKAGE
    path = os.path.join(cache, f"{name}-{version}.tgz")
    if not os.path.isfile(path):
        if shutil.which("npm") is None:
            raise UserError(f"the flags set comes from the npm package {name}@{version}, but npm is not installed; "
                            f"put {name}-{version}.tgz into {cache} or evaluate on your own MMEB-layout folder")
        os.makedirs(cache, exist_ok=True)
        proc = subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=cache, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(path):
            raise UserError(f"npm pack {name}@{version} failed: {proc.stderr.strip()[-300:]}")
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != sha:
        raise UserError(f"{path}: sha256 {got[:16]}... is not the pinned {name}@{version}; delete it and rerun")
    return path


def build_flags(output: str, cache: str, log=print) -> Dict[str, object]:
    from megatron_moca.eval.beir import write_jsonl
    from megatron_moca.eval.svg import svg_rasteriser
    from megatron_moca.ownership import staged

    rasterise = svg_rasteriser(width=320)
    if rasterise is None:
        raise UserError("the flags are SVG files: install cairosvg (pip install cairosvg, part of the dev extra)")
    tarball = fetch_npm_tarball(cache, log)
    with tarfile.open(tarball) as tar, staged(output, "moca data evalset") as staging:
        countries = json.load(tar.extractfile("package/country.json"))
        names = [c["name"] for c in countries]
        if len(set(names)) != len(names):
            raise UserError(f"{tarball}: country names are not unique")
        images = os.path.join(staging, "eval_images", SUBSET)
        os.makedirs(images)
        os.makedirs(os.path.join(staging, SUBSET))
        rows, skipped = [], 0
        svg = os.path.join(staging, "flag.svg")
        for i, country in enumerate(countries):
            with open(svg, "wb") as f:  # cairosvg reads files (relative references resolve beside them)
                f.write(tar.extractfile("package/" + country["flag_4x3"]).read())
            png = rasterise(svg)
            if png is None:
                skipped += 1
                continue
            image = f"{SUBSET}/{country['code']}.png"
            with open(os.path.join(staging, "eval_images", image), "wb") as f:
                f.write(png)
            others = names[:i] + names[i + 1:]
            rows.append({"qry_text": QUERY, "qry_img_path": image, "tgt_text": [country["name"], *others],
                         "tgt_img_path": [""] * len(names)})
        os.remove(svg)
        write_jsonl(os.path.join(staging, SUBSET, "test.jsonl"), rows)
        summary = {"name": "flags", "source": "{}={}".format(*PACKAGE[:2]), "queries": len(rows),
                   "documents": len(names), "skipped": {"svg_unreadable": skipped}}
        with open(os.path.join(staging, "evalset.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "output": output}
