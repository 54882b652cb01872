"""Tokenizer, chat template and streaming detokenization without transformers.

* tokenizer.json is read by `tokenizers` (the Rust library transformers uses too).
* The chat template comes from chat_template.jinja or tokenizer_config.json and is
  rendered with jinja2 the way transformers renders it (sandboxed, trim_blocks,
  lstrip_blocks, `raise_exception`, `tojson`), then encoded without adding special
  tokens, as `apply_chat_template` does.
* Streaming text: a token can end in the middle of a UTF-8 character or change how the
  previous ones decode, so each piece is the difference between decoding a short
  window with and without the new tokens, emitted once it does not end in U+FFFD.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from edgekv.errors import EdgekvError


class TokenizerError(EdgekvError):
    """A tokenizer problem the user can fix (no chat template, unreadable files)."""


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # tokenizer_config stores AddedToken dicts sometimes
        return value.get("content")
    return value if isinstance(value, str) else None


class BundleTokenizer:
    def __init__(self, directory: str | Path, eos_token_id: int | list[int] | None = None) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            self.tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise TokenizerError(f"cannot read {directory / 'tokenizer.json'}: {e}") from None
        cfg_path = directory / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self._find_template(directory)
        self.special = {k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                        if (s := _token_str(self.config.get(k))) is not None}
        # End of generation: the model config's eos id(s) and the tokenizer's eos token.
        ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        self.eos_ids = {int(i) for i in ids if i is not None}
        if "eos_token" in self.special and (i := self.tok.token_to_id(self.special["eos_token"])) is not None:
            self.eos_ids.add(i)

    def _find_template(self, directory: Path) -> str | None:
        f = directory / "chat_template.jinja"
        if f.is_file():
            return f.read_text()
        t = self.config.get("chat_template")
        if isinstance(t, list):  # named templates: use "default"
            t = next((x["template"] for x in t if x.get("name") == "default"), None)
        return t

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this bundle's tokenizer has no chat template (no chat_template.jinja "
                                 "and none in tokenizer_config.json); pass a plain prompt string instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"chat messages need 'role' and 'content', got {m!r}")
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated token ids into text pieces; holds only a few ids at a time."""

    def __init__(self, tokenizer: BundleTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[:prefix] only give context for the ones after it
        self.read = 0    # ids[:read] have been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix:self.read])
        text = dec(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # incomplete character (or nothing printable yet): wait for more
        piece = text[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        del self.ids[:self.prefix]  # keep the window short: memory stays flat
        self.read -= self.prefix
        self.prefix = 0
        return piece

    def flush(self) -> str:
        """Whatever is left (e.g. a trailing incomplete character) at the end."""
        dec = self.tokenizer.decode
        rest = dec(self.ids[self.prefix:])[len(dec(self.ids[self.prefix:self.read])):]
        self.ids, self.prefix, self.read = [], 0, 0
        return rest
