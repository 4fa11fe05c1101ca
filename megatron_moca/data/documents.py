"""Interleaved documents: the in-memory form, and parsing of the two input forms `moca data prepare` reads.

MoCa form:    {"text": "... <|vision_start|><|image_pad|><|vision_end|> ...", "images": [img, ...]}
OBELICS form: {"texts": [str | null, ...], "images": [img | null, ...]} (aligned lists, one of the two
              set at each position)
An image is a path (relative to the input file), {"path": ...}, {"bytes": <base64>}, a data URI, or raw
bytes (parquet binary columns). Problems raise DocumentError with a short reason that the caller
counts and logs with the sample key.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class DocumentError(ValueError):
    """A document that cannot be used; str(e) is the reason counted in manifests and logs, `kind` the
    category the stage-1 loader counts it under (shards.SKIP_REASONS)."""

    def __init__(self, reason: str, kind: str = "bad_json"):
        super().__init__(reason)
        self.kind = kind


@dataclass
class Document:
    """One interleaved document: text pieces and images in reading order."""

    key: str
    segments: List[Union[str, int]]  # str = text, int = index into images
    images: List[bytes]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def text_chars(self) -> int:
        return sum(len(s) for s in self.segments if isinstance(s, str))


@dataclass(frozen=True)
class ImageFiles:
    """Where image paths of a record are read: relative to `base` (the input file's folder), confined to
    `root` (the --input folder; real paths compared, links resolved) unless allow_outside. The default reads
    a caller's own paths as given (relative to the working directory); `moca data prepare` confines the
    paths its input tables name."""

    base: str = "."
    root: Optional[str] = None
    allow_outside: bool = True

    def path(self, ref: str) -> str:
        if self.allow_outside:
            return ref if os.path.isabs(ref) else os.path.join(self.base, ref)
        from megatron_moca.data.files import resolved_inside

        path = resolved_inside(self.root or self.base, ref, self.base)
        if path is None:
            raise DocumentError("image path outside the input folder (absolute, '..' or a symbolic link out)")
        return path


def _image_bytes(ref, files: ImageFiles) -> bytes:
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return _image_bytes(ref["bytes"], files) if not isinstance(ref["bytes"], str) \
                else _b64(ref["bytes"])
        if ref.get("path"):
            return _image_bytes(ref["path"], files)
        raise DocumentError("image entry has neither bytes nor path")
    if isinstance(ref, str):
        if ref.startswith("data:"):
            return _b64(ref.split(",", 1)[-1])
        from megatron_moca.data.files import UnreadableFile, read_bounded

        try:  # never outside the input folder, a FIFO, a device or an unbounded file
            return read_bounded(files.path(ref))
        except UnreadableFile as e:
            raise DocumentError(f"image file {e}") from None
    raise DocumentError(f"unsupported image reference of type {type(ref).__name__}")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise DocumentError("image bytes are not valid base64") from None


def from_record(record: dict, key: str, files: ImageFiles = ImageFiles(), source: str = "") -> Document:
    """Parse a MoCa-form or OBELICS-form record into a Document (DocumentError for mistyped fields); image
    paths are read through `files`."""
    if not isinstance(record, dict):
        raise DocumentError("record is not a JSON object")
    for field_name, kinds, what in (("images", (list, tuple), "a list"), ("texts", (list, tuple), "a list"),
                                    ("meta", (dict,), "an object")):
        if record.get(field_name) is not None and not isinstance(record[field_name], kinds):
            raise DocumentError(f"'{field_name}' is not {what}")
    if "texts" in record:
        return _from_obelics(record, key, files, source)
    if "text" in record:
        return _from_moca(record, key, files, source)
    raise DocumentError("record has neither 'text' (MoCa form) nor 'texts' (OBELICS form)")


def _from_moca(record: dict, key: str, files: ImageFiles, source: str) -> Document:
    text = record["text"]
    if not isinstance(text, str):
        raise DocumentError("'text' is not a string")
    images = record.get("images") or []
    pieces = text.split(PLACEHOLDER)
    if len(pieces) - 1 > len(images):
        raise DocumentError("more image placeholders than images")
    segments: List[Union[str, int]] = []
    data: List[bytes] = []
    for i, piece in enumerate(pieces):
        if piece:
            segments.append(piece)
        if i < len(pieces) - 1:
            if images[i] is None:
                raise DocumentError("image bytes missing for a placeholder")
            segments.append(len(data))
            data.append(_image_bytes(images[i], files))
    return _checked(Document(key, segments, data, source, record.get("meta") or {}))


def _from_obelics(record: dict, key: str, files: ImageFiles, source: str) -> Document:
    texts, images = record.get("texts") or [], record.get("images") or []
    if len(images) not in (0, len(texts)):
        raise DocumentError("'texts' and 'images' differ in length")
    segments: List[Union[str, int]] = []
    data: List[bytes] = []
    for i, text in enumerate(texts):
        image = images[i] if images else None
        if text is not None and image is not None:
            raise DocumentError("a position holds both text and an image")
        if text is not None:
            if not isinstance(text, str):
                raise DocumentError("a text entry is not a string")
            if text:
                segments.append(text)
        elif image is not None:
            segments.append(len(data))
            data.append(_image_bytes(image, files))
    return _checked(Document(key, segments, data, source, record.get("meta") or {}))


LONE_SURROGATE = "text holds a lone surrogate (not valid Unicode)"


def valid_unicode(text: str) -> bool:
    """False for strings that no UTF-8 file or tokenizer takes: JSON's "\ud800" escapes (valid JSON, common in
    scraped text) give lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _checked(doc: Document) -> Document:
    if not doc.images and not doc.text_chars:
        raise DocumentError("zero-length text and no images")
    try:
        meta = json.dumps(doc.meta, ensure_ascii=False)
    except (TypeError, ValueError):
        raise DocumentError("'meta' is not JSON data") from None
    if not all(valid_unicode(text) for text in doc.segments if isinstance(text, str)) or not valid_unicode(meta):
        raise DocumentError(LONE_SURROGATE)
    return doc
