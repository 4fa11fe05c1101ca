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

import io
import json
import os
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Union

from megatron_moca.data.documents import Document, DocumentError
from megatron_moca.data.files import file_sha256

FORMAT = "megatron_moca.interleaved.v1"
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
IMAGE_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
MAX_IMAGES = 1024
"""Most images one sample may hold: member names and segments naming a larger index are refused."""
MAX_MEMBER_BYTES = 256 * 2**20
"""Default bound on one member (the .json or one encoded image): larger members are never read."""
# Why the stage-1 loader skips a sample; the counts in metrics.jsonl (`skipped_samples`) use these names.
SKIP_REASONS = {
    "unreadable_sample": "the tar entry or its shard cannot be read at the indexed position",
    "unreadable_shard": "the whole shard is missing, truncated or not a tar",
    "oversized_member": "a member larger than data.max_member_bytes (never read)",
    "bad_json": "the .json member is not UTF-8 JSON of the expected types",
    "image_index": "image members or segments with a missing, absurd or duplicate index",
    "bad_image": "an image that does not decode (truncated, corrupt, too large, extreme aspect)",
    "bad_text": "text with vision special tokens, or nothing left after tokenisation",
    "too_long": "more tokens than a packed row",
    "unexpected_error": "any other error while reading or building the sample (logged with its type)",
}


def manifest_path(folder: str, setting: str) -> str:
    """`folder`'s manifest.json; a UserError naming the setting and the folder when it has none."""
    from megatron_moca.errors import UserError

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{setting}: {folder} has no {MANIFEST} (write shards with `moca data prepare` or "
                        "`moca data demo`)")
    return path


def read_manifest(folder: str, setting: str) -> List[dict]:
    """The shard entries of `folder`'s manifest, checked before any training: each names a shard file
    inside the folder (a relative path without '..' or hidden parts: `moca data merge` lists the
    partitions' subfolders) that exists with the byte size the manifest records. A UserError naming
    the setting, the folder and the first bad entry otherwise."""
    from megatron_moca.errors import UserError

    path = manifest_path(folder, setting)
    try:
        with open(path) as f:
            shards = json.load(f)["shards"]
        entries = [(str(s["name"]), int(s["samples"]), s.get("bytes"), s.get("sha256")) for s in shards]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{setting}: {path} is not a shard manifest ({type(e).__name__}: {e})") from None
    for name, samples, size, _ in entries:
        parts = name.split("/")
        if not name or os.path.isabs(name) or any(not part or part.startswith(".") for part in parts):
            raise UserError(f"{setting}: {path} names {name[:80]!r}, which is not a file inside {folder}")
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            raise UserError(f"{setting}: {path} names {name}, which is missing from {folder}")
        if samples < 0 or (size is not None and os.path.getsize(shard) != int(size)):
            raise UserError(f"{setting}: {shard} holds {os.path.getsize(shard)} bytes, the manifest says {size} "
                            "(truncated or replaced? `moca data verify` checks every shard)")
    return [dict(name=name, samples=samples, sha256=sha256) for name, samples, _, sha256 in entries]


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
    """Inverse of encode_document; DocumentError (with its SKIP_REASONS kind) when members are missing,
    mistyped or malformed. Image indices are bounded by MAX_IMAGES before anything is built from them."""
    if "json" not in files:
        raise DocumentError("no .json member")
    try:
        body = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DocumentError(f"malformed .json member ({type(e).__name__})") from None
    if not isinstance(body, dict) or not isinstance(body.get("segments"), list):
        raise DocumentError("the .json member has no 'segments' list")
    images = {}
    for name, data in files.items():
        if name.startswith("img"):
            index = name[3:].split(".", 1)[0]
            if not (index.isdigit() and len(index) <= 6 and int(index) < MAX_IMAGES):
                raise DocumentError(f"image member {name[:40]!r}: index outside 0..{MAX_IMAGES - 1}", "image_index")
            images[int(index)] = data
    if set(images) != set(range(len(images))):
        raise DocumentError("image members are not numbered 0..n-1", "image_index")
    segments: List[Union[str, int]] = []
    for seg in body["segments"]:
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            segments.append(seg["text"])
        elif isinstance(seg, dict) and type(seg.get("image")) is int:
            if seg["image"] not in images:
                raise DocumentError(f"segment names image {seg['image']}, which has no member", "image_index")
            segments.append(seg["image"])
        else:
            raise DocumentError(f"a segment is neither {{'text': str}} nor {{'image': int}}: {str(seg)[:40]}")
    meta = body.get("meta") or {}
    source = body.get("source", "")
    if not isinstance(meta, dict) or not isinstance(source, str):
        raise DocumentError("'meta' is not an object or 'source' not a string")
    return Document(key, segments, [images[i] for i in range(len(images))], source, meta)


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
                 max_shard_samples: int = 0, done: Optional[List[ShardInfo]] = None,
                 on_close: Optional[Callable[[ShardInfo], None]] = None):
        """done: shards already complete in `folder` (a resumed write numbers the next one after them);
        on_close: called after each shard is complete under its final name."""
        self.folder, self.max_shard_bytes, self.prefix = folder, max_shard_bytes, prefix
        self.max_shard_samples = max_shard_samples
        os.makedirs(folder, exist_ok=True)
        self.shards: List[ShardInfo] = list(done or [])
        self.on_close = on_close
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
        self._info.bytes, self._info.sha256 = os.path.getsize(final), file_sha256(final)
        self.shards.append(self._info)
        self._tar = None
        if self.on_close is not None:
            self.on_close(self._info)

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
    kind: str = "unreadable_sample"
    """Its category, one of SKIP_REASONS (the loader's counts in metrics.jsonl use these names)."""


def _member_too_large(member: tarfile.TarInfo, max_member_bytes: int) -> bool:
    return max_member_bytes > 0 and member.size > max_member_bytes


def read_shard(path: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Union[Document, ReadError]]:
    """Documents of one shard in order; bad samples and truncated/unreadable shards become ReadErrors.
    A member larger than max_member_bytes is never read: its sample becomes a ReadError."""
    shard = os.path.basename(path)
    try:
        complete = _has_end_marker(path)
        tar = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError) as e:
        yield ReadError("", shard, f"unreadable shard ({type(e).__name__}: {e})", "unreadable_shard")
        return
    current, files, oversized = None, {}, None
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key != current and current is not None:
                    yield oversized or _decoded(current, files, shard)
                    files, oversized = {}, None
                current = key
                if _member_too_large(member, max_member_bytes):
                    oversized = _oversized(key, shard, member, max_member_bytes)
                elif oversized is None and len(files) <= MAX_IMAGES:
                    files[suffix] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        yield ReadError(current or "", shard, f"truncated shard ({type(e).__name__}); later samples lost",
                        "unreadable_shard")
        return
    if current is not None:
        yield oversized or _decoded(current, files, shard)
    if not complete:
        # tarfile reads a tar cut at a member boundary as a shorter, valid archive: say so
        yield ReadError(current or "", shard, "truncated shard (no end-of-archive marker); later samples lost",
                        "unreadable_shard")


def index_shard(path: str) -> List[int]:
    """Byte offsets of each sample's first member: from the `.idx` file, else (no .idx, or one cut short: not
    a whole number of 8-byte offsets) by scanning the tar."""
    raw = _index_bytes(path)
    if raw is not None and len(raw) % 8 == 0:
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


def _index_bytes(path: str) -> Optional[bytes]:
    """The content of the shard's `.idx` (None where there is none or it is not a regular file)."""
    from megatron_moca.data.files import file_problem

    if file_problem(path + ".idx", 0):
        return None
    with open(path + ".idx", "rb") as f:
        return f.read()


def read_sample(path: str, offset: int, max_member_bytes: int = MAX_MEMBER_BYTES) -> Union[Document, ReadError]:
    """The sample whose first member starts at `offset` (from index_shard). Member sizes are checked
    against max_member_bytes and the member count against MAX_IMAGES before anything is read."""
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
                    if not member.isfile():
                        continue
                    if _member_too_large(member, max_member_bytes):
                        return _oversized(key, shard, member, max_member_bytes)
                    if len(files) > MAX_IMAGES:
                        return ReadError(key, shard, f"more than {MAX_IMAGES} image members", "image_index")
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


def _oversized(key: str, shard: str, member: tarfile.TarInfo, limit: int) -> ReadError:
    return ReadError(key, shard, f"member {member.name[:60]} holds {member.size} bytes, above the limit of {limit}",
                     "oversized_member")


def _decoded(key: str, files: Dict[str, bytes], shard: str) -> Union[Document, ReadError]:
    try:
        return decode_document(key, files)
    except DocumentError as e:
        return ReadError(key, shard, str(e), e.kind)


@dataclass
class ShardCheck:
    """What `moca data verify` found in one shard (problems empty: the shard is as its manifest says)."""

    name: str
    samples: int = 0
    bad_samples: Dict[str, int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)


def verify_shards(folder: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> List[ShardCheck]:
    """Every shard of `folder`'s manifest checked against it: sha256, sample count, `.idx` offsets, and
    each sample read and decoded (no image decoding) with bad ones counted by SKIP_REASONS kind."""
    checks = []
    for entry in read_manifest(folder, "moca data verify"):
        path = os.path.join(folder, entry["name"])
        check = ShardCheck(entry["name"])
        if entry["sha256"] not in (None, "", file_sha256(path)):
            check.problems.append("sha256 differs from the manifest")
        for item in read_shard(path, max_member_bytes):
            if isinstance(item, ReadError):
                check.bad_samples[item.kind] = check.bad_samples.get(item.kind, 0) + 1
            else:
                check.samples += 1
        read = check.samples + sum(n for kind, n in check.bad_samples.items() if kind != "unreadable_shard")
        if read != entry["samples"]:
            check.problems.append(f"holds {read} samples, the manifest says {entry['samples']}")
        raw = _index_bytes(path)
        if raw is not None and len(raw) % 8:
            check.problems.append(f"its .idx is cut short ({len(raw)} bytes, not whole 8-byte offsets): delete it "
                                  "(readers then scan the shard) or copy it again")
        elif raw is not None and len(raw) // 8 != read:
            check.problems.append(f"its .idx lists {len(raw) // 8} samples, the shard holds {read}")
        if check.bad_samples:
            check.problems.append("unusable samples: " + ", ".join(f"{n} {k}" for k, n in check.bad_samples.items()))
        checks.append(check)
    return checks
