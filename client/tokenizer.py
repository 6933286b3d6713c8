"""SentencePiece tokenizer, with BOS added as Hugging Face's LlamaTokenizer does."""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from client.errors import UserError


class Tokenizer:
    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.model"
        if not path.is_file():
            raise UserError(f"{path}: missing; copy the model's SentencePiece tokenizer.model "
                            "into MODEL_DIR")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})")
        self.add_bos = True
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file():
            try:
                self.add_bos = bool(json.loads(tc.read_text()).get("add_bos_token", True))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{tc}: not valid JSON; fix or delete it")
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if self.add_bos if bos is None else bos:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


class StreamDecoder:
    """Turns a growing list of ids into text increments, decoding only a short window: the text of
    ids[prefix:] minus that of ids[prefix:read] is what the new ids add (both decoded from the
    same start, so SentencePiece's leading-space handling cancels out). A trailing U+FFFD (half a
    UTF-8 character from byte pieces) is held back until the next piece completes it."""

    def __init__(self, tok: Tokenizer, ids: list[int]):
        self.tok, self.ids = tok, list(ids)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - 6)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if text.startswith(before) else ""
