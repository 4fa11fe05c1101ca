"""The interleaved-document shard format (webdataset tar), its writer and its reader.

A shard `shard-000000.tar` holds one webdataset sample per document:
  <key>.json          {"segments": [{"text": str} | {"image": i}, ...], "source": str, "meta": {...}}
  <key>.img<i>.<ext>  the i-th image's original encoded bytes (jpg, png, webp, ...); decoded at load time
Keys contain no dots (webdataset splits the key at the first dot). Members are written in key order
with fixed metadata (mtime 0, uid 0), so the same input gives byte-identical shards.
`shard-000000.tar.idx` holds the byte offset of each sample's first member (int64, little-endian), so
a loader can read sample k of a shard directly; `index_shard` builds the same for foreign tars.
`manifest.json` beside the shards lists every shard (samples, bytes, sha256, text and image tokens)
and the skipped inputs by reason; `skipped.jsonl` names each skipped sample and why.
The reader never raises on bad content: it yields ReadError records (key, shard, reason) instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Union

from megatron_moca.data.documents import Document, DocumentError

FORMAT = "megatron_moca.interleaved.v1"
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
IMAGE_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def manifest_path(folder: str, setting: str) -> str:
    """`folder`'s manifest.json; a UserError naming the setting and the folder when it has none."""
    from megatron_moca.errors import UserError

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{setting}: {folder} has no {MANIFEST} (write shards with `moca data prepare` or "
                        "`moca data demo`)")
    return path


def safe_key(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"GIF":
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return "img"


def encode_document(doc: Document) -> Dict[str, bytes]:
    """Member name suffix -> bytes for one document."""
    segments = [{"text": s} if isinstance(s, str) else {"image": s} for s in doc.segments]
    files = {"json": json.dumps({"segments": segments, "source": doc.source, "meta": doc.meta},
                                ensure_ascii=False).encode()}
    for i, data in enumerate(doc.images):
        files[f"img{i}.{image_ext(data)}"] = data
    return files


def decode_document(key: str, files: Dict[str, bytes]) -> Document:
    """Inverse of encode_document; DocumentError when members are missing or malformed."""
    if "json" not in files:
        raise DocumentError("no .json member")
    try:
        body = json.loads(files["json"].decode("utf-8"))
        raw_segments = body["segments"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DocumentError(f"malformed .json member ({type(e).__name__})") from None
    images = {}
    for name, data in files.items():
        if name.startswith("img"):
            index = name[3:].split(".", 1)[0]
            if index.isdigit():
                images[int(index)] = data
    segments: List[Union[str, int]] = []
    for seg in raw_segments:
        if "text" in seg:
            segments.append(str(seg["text"]))
        elif "image" in seg:
            i = int(seg["image"])
            if i not in images:
                raise DocumentError("image bytes missing for a placeholder")
            segments.append(i)
    n = max(images) + 1 if images else 0
    if set(images) != set(range(n)):
        raise DocumentError("image members are not numbered 0..n-1")
    return Document(key, segments, [images[i] for i in range(n)], body.get("source", ""), body.get("meta") or {})


@dataclass
class ShardInfo:
    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    text_tokens: int = 0
    image_tokens: int = 0
    images: int = 0


class ShardWriter:
    """Writes documents into shards of about `max_shard_bytes`; a shard is renamed from `.partial`
    to `.tar` only when complete, so a crash never leaves a truncated shard under a final name."""

    def __init__(self, folder: str, max_shard_bytes: int = 256 * 2**20, prefix: str = "shard",
                 max_shard_samples: int = 0):
        self.folder, self.max_shard_bytes, self.prefix = folder, max_shard_bytes, prefix
        self.max_shard_samples = max_shard_samples
        os.makedirs(folder, exist_ok=True)
        self.shards: List[ShardInfo] = []
        self._tar = None
        self._info = None

    def _open(self):
        self._info = ShardInfo(name=f"{self.prefix}-{len(self.shards):06d}.tar")
        self._path = os.path.join(self.folder, self._info.name + ".partial")
        self._file = open(self._path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._offsets = []

    def _close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        final = os.path.join(self.folder, self._info.name)
        with open(final + ".idx", "wb") as f:
            f.write(struct.pack(f"<{len(self._offsets)}q", *self._offsets))
        os.replace(self._path, final)
        digest = hashlib.sha256()
        with open(final, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        self._info.bytes, self._info.sha256 = os.path.getsize(final), digest.hexdigest()
        self.shards.append(self._info)
        self._tar = None

    def write(self, doc: Document, text_tokens: int = 0, image_tokens: int = 0) -> str:
        """Append one document; returns the shard name it went to."""
        if self._tar is None:
            self._open()
        self._offsets.append(self._tar.offset)
        for suffix, data in sorted(encode_document(doc).items()):
            info = tarfile.TarInfo(f"{doc.key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._info.samples += 1
        self._info.text_tokens += text_tokens
        self._info.image_tokens += image_tokens
        self._info.images += len(doc.images)
        name = self._info.name
        if self._file.tell() >= self.max_shard_bytes or self._info.samples == self.max_shard_samples:
            self._close_shard()
        return name

    def close(self) -> List[ShardInfo]:
        self._close_shard()
        return self.shards


@dataclass
class ReadError:
    """A sample (or a whole shard) that could not be read; counted and logged, never raised."""

    key: str
    shard: str
    reason: str


def read_shard(path: str) -> Iterator[Union[Document, ReadError]]:
    """Documents of one shard in order; bad samples and truncated/unreadable shards become ReadErrors."""
    shard = os.path.basename(path)
    try:
        complete = _has_end_marker(path)
        tar = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError) as e:
        yield ReadError("", shard, f"unreadable shard ({type(e).__name__}: {e})")
        return
    current, files = None, {}
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key != current and current is not None:
                    yield _decoded(current, files, shard)
                    files = {}
                current = key
                files[suffix] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        yield ReadError(current or "", shard, f"truncated shard ({type(e).__name__}); later samples lost")
        return
    if current is not None:
        yield _decoded(current, files, shard)
    if not complete:
        # tarfile reads a tar cut at a member boundary as a shorter, valid archive: say so
        yield ReadError(current or "", shard, "truncated shard (no end-of-archive marker); later samples lost")


def index_shard(path: str) -> List[int]:
    """Byte offsets of each sample's first member: from the `.idx` file, else by scanning the tar."""
    if os.path.isfile(path + ".idx"):
        with open(path + ".idx", "rb") as f:
            raw = f.read()
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    offsets, current = [], None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key = member.name.partition(".")[0]
                if member.isfile() and key != current:
                    offsets.append(member.offset)
                    current = key
    except (OSError, tarfile.TarError, EOFError):
        pass  # a truncated tar: the samples before the cut are indexed, reading them reports the rest
    return offsets


def read_sample(path: str, offset: int) -> Union[Document, ReadError]:
    """The sample whose first member starts at `offset` (from index_shard)."""
    shard = os.path.basename(path)
    files, key = {}, None
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    name_key, _, suffix = member.name.partition(".")
                    if key is None:
                        key = name_key
                    elif name_key != key:
                        break
                    if member.isfile():
                        files[suffix] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        return ReadError(key or "", shard, f"unreadable sample ({type(e).__name__})")
    if key is None:
        return ReadError("", shard, "no sample at the indexed offset")
    return _decoded(key, files, shard)


def _has_end_marker(path: str) -> bool:
    """A complete tar ends with two zero blocks (the writer's tarfile always adds them)."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _decoded(key: str, files: Dict[str, bytes], shard: str) -> Union[Document, ReadError]:
    try:
        return decode_document(key, files)
    except DocumentError as e:
        return ReadError(key, shard, str(e))
