"""Chat messages -> prompt token ids: the model's chat template from tokenizer_config.json when it
has one (rendered with Jinja2, as Hugging Face's apply_chat_template does), else Llama 2's

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from client.errors import UserError


class ChatError(ValueError):
    """Messages the template cannot render (the message says why): a 400 for the client."""


def _token_text(value, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        value = value.get("content")
    return value if isinstance(value, str) and value else default


class ChatFormat:
    def __init__(self, model_dir: Path, tokenizer):
        self.tok = tokenizer
        self.template, self.bos, self.eos = None, "<s>", "</s>"
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: not valid JSON; fix or delete it")
        self.bos = _token_text(cfg.get("bos_token"), self.bos)
        self.eos = _token_text(cfg.get("eos_token"), self.eos)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self.template = env.from_string(template)
            except TemplateError as e:
                raise UserError(f"{path}: its chat_template does not parse ({e})")

    @property
    def name(self) -> str:
        return "tokenizer_config.json chat_template" if self.template else "Llama 2 [INST]"

    def encode(self, messages: list[dict]) -> list[int]:
        """messages [{"role", "content"}] -> token ids of the prompt that asks for the next
        assistant message."""
        if not messages:
            raise ChatError("messages is empty: give at least one user message")
        return self._templated(messages) if self.template else self._llama2(messages)

    def _templated(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError
        try:
            text = self.template.render(messages=messages, bos_token=self.bos, eos_token=self.eos,
                                        add_generation_prompt=True)
        except TemplateError as e:
            raise ChatError(f"the model's chat template refused the messages: {e}")
        # the special tokens' text becomes their ids (SentencePiece would spell them out)
        ids = []
        for part in re.split(f"({re.escape(self.bos)}|{re.escape(self.eos)})", text):
            if part == self.bos:
                ids.append(self.tok.bos_id)
            elif part == self.eos:
                ids.append(self.tok.eos_id)
            elif part:
                ids += self.tok.encode(part, bos=False)
        return ids

    def _llama2(self, messages: list[dict]) -> list[int]:
        system = None
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        roles = [m["role"] for m in messages]
        if not roles or roles[-1] != "user" or any(
                r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
            raise ChatError("the Llama 2 chat format needs messages alternating user/assistant "
                            "(after an optional system message), ending with a user message; "
                            f"got roles {['system'] * (system is not None) + roles}")
        ids = []
        for i, m in enumerate(messages):
            text = m["content"].strip()
            if m["role"] == "user":
                if i == 0 and system is not None:
                    text = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{text}"
                ids += self.tok.encode(f"[INST] {text} [/INST]", bos=True)
            else:
                ids += self.tok.encode(f" {text} ", bos=False) + [self.tok.eos_id]
        return ids
