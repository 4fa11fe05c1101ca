"""`moca data demo`: the demo pre-training corpus, built from real documents in pinned Debian packages.

  gimp-help-en        the GIMP manual: HTML pages -> interleaved documents (paragraphs and figures in
                      DOM order; navigation icons, callouts and stylesheet images dropped)
  python-skimage-doc  scikit-image's example gallery: text and result figures in DOM order
  wordnet-base        WordNet glosses -> text-only documents (MLM without images)
  r-doc-pdf           R manuals rendered at 72 dpi (pypdfium2, as `pdftoppm -r 72`): one document per
                      page = the page image + its text layer. R-intro, R-data and R-lang are left out:
                      they belong to the document-retrieval evaluation set.
Packages are fetched with `apt-get download PKG=VERSION`, checked against pinned SHA-256 sums, unpacked
with `dpkg-deb -x` into a cache, and never committed. Where apt is unavailable the error names the
alternative: shards from your own data via `moca data prepare`.
"""

from __future__ import annotations

import html
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_moca.data.documents import Document
from megatron_moca.data.files import file_sha256
from megatron_moca.errors import UserError

# (package, version, sha256 of the .deb as served by Debian bookworm)
PINNED = [
    ("gimp-help-en", "2.10.34-2", "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36"),
    ("python-skimage-doc", "0.19.3-8", "2c87d8f7d4504b29fe80283a24a153fb4175b0e4964bd90a2a0152b36bb6b468"),
    ("wordnet-base", "1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    ("r-doc-pdf", "4.2.2.20221110-2", "beb104ad5818d261f280a868294645ca31d7c63365f2c9a55aa3ca9aad5aa71d"),
]
TRAINING_PDFS = ("R-exts.pdf", "R-admin.pdf", "R-ints.pdf", "R-FAQ.pdf")  # not the evaluation manuals
SKIP_IMAGES = re.compile(r"(stylesheet-images|callouts|/(prev|next|up|home)\.png$|_static/|GitHub-Mark)")
TEXT_TAGS = {"p", "h1", "h2", "h3", "h4", "li", "dt", "dd", "pre", "figcaption", "td", "th"}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megatron_moca", "debian")


def fetch_packages(cache: str, log=print, packages: Sequence[Tuple[str, str, str]] = PINNED,
                   alternative: str = "build shards from your own documents with `moca data prepare`"
                   ) -> List[Tuple[str, str]]:
    """Download (cached, checksummed) and unpack each pinned (package, version, sha256); returns the
    (package, version) pairs used. `alternative`: what the user can do where apt is unavailable."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"this data is built from Debian packages, but apt-get/dpkg-deb are unavailable here; "
                        f"{alternative}")
    from megatron_moca.ownership import mark, remove_ours

    os.makedirs(cache, exist_ok=True)
    used = []
    for package, version, sha in packages:
        target = os.path.join(cache, "extracted", package)
        stamp = os.path.join(target, ".complete")
        if os.path.isfile(stamp):
            used.append((package, open(stamp).read().strip()))
            continue
        debs = [f for f in os.listdir(cache) if f.startswith(package + "_") and f.endswith(".deb")]
        if not debs:
            proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=cache, capture_output=True,
                                  text=True)
            if proc.returncode != 0:  # another distribution: take what it has and record it
                log(f"{package}={version} not available ({proc.stderr.strip()[-200:]}); trying the current version")
                proc = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"apt-get download {package} failed: {proc.stderr.strip()[-300:]}; {alternative}")
            debs = [f for f in os.listdir(cache) if f.startswith(package + "_") and f.endswith(".deb")]
        deb = os.path.join(cache, sorted(debs)[-1])
        got = file_sha256(deb)
        actual = deb.rsplit("_", 2)[-2].replace("%3a", ":")
        if got != sha:
            log(f"{os.path.basename(deb)}: sha256 {got[:16]}... differs from the pinned {version}; using it and "
                f"recording version {actual}")
        remove_ours(target, "an unfinished unpack")  # an earlier unpack cut short; nothing else is deleted
        os.makedirs(target)
        mark(target, "moca data demo")
        proc = subprocess.run(["dpkg-deb", "-x", deb, target], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()[-300:]}")
        with open(stamp, "w") as f:
            f.write(actual if got != sha else version)
        used.append((package, actual if got != sha else version))
    return used


class _InterleavedHTML(HTMLParser):
    """Text of content tags and <img> sources, in document order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.items: List[Tuple[str, str]] = []
        self._depth = 0
        self._buffer: List[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in TEXT_TAGS:
            self._flush()
            self._depth += 1
        elif tag == "img":
            src = dict(attrs).get("src") or ""
            if src and not SKIP_IMAGES.search(src):
                self._flush()
                self.items.append(("image", src))

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in TEXT_TAGS:
            self._flush()
            self._depth = max(0, self._depth - 1)

    def handle_data(self, data):
        if self._depth and not self._skip:
            self._buffer.append(data)

    def _flush(self):
        text = re.sub(r"\s+", " ", html.unescape("".join(self._buffer))).strip()
        if text:
            self.items.append(("text", text))
        self._buffer = []


def html_document(path: str, key: str, source: str) -> Optional[Document]:
    """An interleaved Document from one HTML page (None if it has no text)."""
    parser = _InterleavedHTML()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    parser.close()
    segments, images = [], []
    base = os.path.dirname(path)
    for kind, value in parser.items:
        if kind == "text":
            segments.append(value + "\n")
            continue
        image_path = os.path.normpath(os.path.join(base, value.split("?")[0]))
        if os.path.isfile(image_path) and image_path.lower().endswith((".png", ".jpg", ".jpeg", ".gif")):
            segments.append(len(images))
            with open(image_path, "rb") as f:
                images.append(f.read())
    if not any(isinstance(s, str) for s in segments):
        return None
    return Document(key, segments, images, source)


def wordnet_documents(root: str, glosses_per_document: int = 40) -> Iterator[Document]:
    """Text-only documents of WordNet glosses ("word: gloss" lines)."""
    batch, n = [], 0
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(root, f"data.{pos}"), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                fields, gloss = line.split("|", 1)
                word = fields.split()[4].replace("_", " ")
                batch.append(f"{word}: {gloss.strip()}")
                if len(batch) == glosses_per_document:
                    yield Document(f"wordnet-{n:06d}", ["\n".join(batch)], [], "wordnet-base")
                    batch, n = [], n + 1
    if batch:
        yield Document(f"wordnet-{n:06d}", ["\n".join(batch)], [], "wordnet-base")


def render_page_png(page) -> bytes:
    """A pypdfium2 page rendered at 72 dpi (as `pdftoppm -r 72`), RGB PNG bytes."""
    buf = io.BytesIO()
    page.render(scale=1.0).to_pil().convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def pdf_page_documents(folder: str, names: Sequence[str], max_pages: int = 0) -> Iterator[Document]:
    """One document per PDF page: the page rendered at 72 dpi (PNG) followed by its text layer."""
    import pypdfium2 as pdfium

    count = 0
    for name in names:
        pdf = pdfium.PdfDocument(os.path.join(folder, name))
        try:
            for i in range(len(pdf)):
                if max_pages and count >= max_pages:
                    return
                page = pdf[i]
                text = re.sub(r"[ \t]*\r?\n", "\n", page.get_textpage().get_text_range()).strip()
                segments = [0, text + "\n"] if text else [0]
                yield Document(f"rdoc-{name[:-4]}-p{i + 1:04d}", segments, [render_page_png(page)], "r-doc-pdf",
                               {"pdf": name, "page": i + 1})
                count += 1
        finally:
            pdf.close()


def demo_documents(cache: str, max_per_source: int = 0) -> Iterator[Document]:
    """Documents of the three sources, interleaved source by source in a fixed order."""
    extracted = os.path.join(cache, "extracted")
    gimp = os.path.join(extracted, "gimp-help-en", "usr", "share", "gimp", "2.0", "help", "en")
    skimage = os.path.join(extracted, "python-skimage-doc", "usr", "share", "doc", "python-skimage-doc", "html",
                           "auto_examples")
    wordnet = os.path.join(extracted, "wordnet-base", "usr", "share", "wordnet")
    manuals = os.path.join(extracted, "r-doc-pdf", "usr", "share", "R", "doc", "manual")

    def pages(root, prefix, source):
        count = 0
        for dirpath, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                if not name.endswith(".html") or (max_per_source and count >= max_per_source):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                doc = html_document(os.path.join(dirpath, name), prefix + re.sub(r"[^A-Za-z0-9_-]", "_", rel[:-5]),
                                    source)
                if doc is not None:
                    count += 1
                    yield doc

    yield from pages(gimp, "gimp-", "gimp-help-en")
    yield from pages(skimage, "skimage-", "python-skimage-doc")
    for i, doc in enumerate(wordnet_documents(wordnet)):
        if max_per_source and i >= max_per_source:
            break
        yield doc
    yield from pdf_page_documents(manuals, TRAINING_PDFS, max_per_source)


def build_demo(output: str, cache: str = DEFAULT_CACHE, max_per_source: int = 0, workers: int = 0,
               log=print) -> dict:
    from megatron_moca.data.prepare import write_corpus

    from megatron_moca.ownership import claim

    claim(output, "moca data demo")  # new, empty, or this command's earlier (maybe interrupted) output
    used = fetch_packages(cache, log)
    items = ((d.key, d, "", d.source) for d in demo_documents(cache, max_per_source))
    manifest = write_corpus(items, output, [f"{p}={v}" for p, v in used], workers)
    return manifest
