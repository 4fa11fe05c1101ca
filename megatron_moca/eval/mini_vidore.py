"""mini-ViDoRe (`moca data evalset --name mini_vidore`): a ViDoRe-like visual document retrieval set from
seven Debian manuals (spec data-sources.md, "Evaluation sets").

    corpus   every page of R-intro, R-data, R-lang (r-doc-pdf), octave.pdf, asymptote.pdf, gnuplot.pdf and
             debian-reference.en.pdf, rendered at 72 dpi: 2,149 pages
    queries  each manual's own outline titles (its PDF bookmarks), one query per distinct title per manual
    qrels    the section's pages: from the title's page to the page before the next entry at the same or
             a higher level, at most 5

Written in the BEIR layout that the ViDoRe-v2 reader takes (`moca eval --task vidore`). The R manuals are
kept out of the demo's pre-training corpus. The spec counts 1,891 queries with pypdf's outline reader;
pdfium's outline (used here) yields 1,972 distinct titles per manual.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from megatron_moca.data.demo_corpus import PINNED
from megatron_moca.errors import UserError

PACKAGES = [p for p in PINNED if p[0] == "r-doc-pdf"] + [
    ("octave-doc", "7.3.0-2", "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5"),
    ("asymptote-doc", "2.85+ds-1", "b2ae6e97c64ede66c1e41cc913f790b01188d198557203a2b3c500ba3495e6ca"),
    ("gnuplot-doc", "5.4.4+dfsg1-2", "73fe1816a296594cf6a1d38528f8d740fd650f57a2cb62e029f7920fcd5b31f0"),
    ("debian-reference-en", "2.100", "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"),
]
# (package, path of the PDF inside it)
MANUALS = [
    ("r-doc-pdf", "usr/share/R/doc/manual/R-intro.pdf"),
    ("r-doc-pdf", "usr/share/R/doc/manual/R-data.pdf"),
    ("r-doc-pdf", "usr/share/R/doc/manual/R-lang.pdf"),
    ("octave-doc", "usr/share/doc/octave/octave.pdf"),
    ("asymptote-doc", "usr/share/doc/asymptote/asymptote.pdf"),
    ("gnuplot-doc", "usr/share/doc/gnuplot/gnuplot.pdf"),
    ("debian-reference-en", "usr/share/debian-reference/debian-reference.en.pdf"),
]
MAX_PAGES_PER_QUERY = 5


def outline_sections(entries: List[Tuple[int, str, int]], pages: int) -> List[Tuple[str, List[int]]]:
    """(title, its section's 0-based pages) for outline entries (level, title, first page) in document
    order: a section runs to the page before the next entry at its level or above (at least its first
    page, at most MAX_PAGES_PER_QUERY pages); a repeated title keeps its first section."""
    sections, seen = [], set()
    for i, (level, title, first) in enumerate(entries):
        title = title.strip()
        if not title or title in seen or not 0 <= first < pages:
            continue
        seen.add(title)
        end = next((start for lvl, _, start in entries[i + 1:] if lvl <= level), pages)
        last = max(first, min(end - 1, pages - 1))
        sections.append((title, list(range(first, min(last, first + MAX_PAGES_PER_QUERY - 1) + 1))))
    return sections


def _outline(pdf) -> List[Tuple[int, str, int]]:
    out = []
    for bookmark in pdf.get_toc():
        dest = bookmark.get_dest()
        if dest is not None and dest.get_index() is not None:
            out.append((bookmark.level, bookmark.get_title(), dest.get_index()))
    return out


def build_mini_vidore(output: str, cache: str, log=print) -> Dict[str, object]:
    import pypdfium2 as pdfium

    from megatron_moca.data.demo_corpus import fetch_packages, render_page_png
    from megatron_moca.eval.beir import write_beir
    from megatron_moca.ownership import staged

    used = fetch_packages(cache, log, packages=PACKAGES, alternative="evaluate on your own BEIR-layout folder instead")
    with staged(output, "moca data evalset") as staging:
        os.makedirs(os.path.join(staging, "images"))
        corpus, queries, qrels = [], [], []
        for package, rel in MANUALS:
            path = os.path.join(cache, "extracted", package, rel)
            if not os.path.isfile(path):
                raise UserError(f"{package}: {rel} is missing from the unpacked package")
            name = os.path.basename(rel)[:-4]
            pdf = pdfium.PdfDocument(path)
            try:
                first_doc, pages = len(corpus), len(pdf)
                for i in range(pages):
                    image = f"images/{name}-p{i + 1:04d}.png"
                    with open(os.path.join(staging, image), "wb") as f:
                        f.write(render_page_png(pdf[i]))
                    corpus.append({"_id": f"{name}-p{i + 1:04d}", "text": "", "image": image})
                sections = outline_sections(_outline(pdf), pages)
            finally:
                pdf.close()
            for title, section in sections:
                qid = f"q{len(queries)}"
                queries.append({"_id": qid, "text": title, "source": name})
                qrels += [f"{qid}\t{corpus[first_doc + p]['_id']}\t1" for p in section]
            log(f"{name}: {pages} pages, {len(sections)} queries")
        write_beir(staging, corpus, queries, qrels)
        summary = {"name": "mini_vidore", "source": ", ".join(f"{p}={v}" for p, v in used), "queries": len(queries),
                   "documents": len(corpus), "skipped": {}}
        with open(os.path.join(staging, "evalset.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "output": output}
