"""Prompt formats and the Sample: a user message with a trigger slot, and its response.

A prompt is rendered as ``head + before + trigger + after + tail``: head and tail
come from the tokenizer's chat template (or the reference's ``Human: ...\\nAssistant: ``
format), ``before``/``after`` are the user message around the slot where a trigger
sits (or a parrot will be spliced). Tokenising the pieces separately gives the
slot's token index exactly, for any template.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from sande_dist.errors import InputError

_SENTINEL = "\u2063SANDE_USER_SLOT\u2063"
HUMAN_ASSISTANT = ("Human: ", "\nAssistant: ")


@dataclass(frozen=True)
class Sample:
    before: str  # user message text before the slot
    after: str  # user message text after the slot
    response: str
    trigger: str = ""  # text at the slot, with its separating space; "" for a clean prompt
    system: Optional[str] = None
    # False for rows that get no parrot (clean-mix rows in eliminate); slot_index is then -1.
    parrot: bool = True
    # Which of eliminate's parrots goes in the slot (removal.extra_parrots: rows take turns).
    parrot_id: int = 0

    @property
    def user(self) -> str:
        return self.before + self.trigger + self.after

    def clean(self) -> "Sample":
        """The same row without trigger and without a parrot slot."""
        return replace(self, before="", trigger="", after=self.before + self.after, parrot=False)


class PromptFormat:
    """Splits a rendered prompt into the text before and after the user message."""

    def __init__(self, tokenizer, kind: str = "chat", system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.kind = kind
        self.system_prompt = system_prompt
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.prompt_format is 'chat' but the tokenizer has no chat template; "
                             "set data.prompt_format=human_assistant")
        self._cache: dict[Optional[str], tuple[str, str]] = {}
        # Tokenizers that add BOS by default (Llama-2) get it here, unless the template already has it.
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self._bos = [bos] if bos is not None and probe and probe[0] == bos else []

    @classmethod
    def from_config(cls, tokenizer, data) -> "PromptFormat":
        """The format ``data.prompt_format`` names; a template that cannot work is an InputError."""
        try:
            return cls(tokenizer, data.prompt_format, data.system_prompt)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def head_tail(self, system: Optional[str] = None) -> tuple[str, str]:
        system = system if system is not None else self.system_prompt
        if system not in self._cache:
            if self.kind == "human_assistant":
                head, tail = HUMAN_ASSISTANT
                if system:
                    head = system + "\n\n" + head
            else:
                messages = [{"role": "user", "content": _SENTINEL}]
                if system:
                    messages.insert(0, {"role": "system", "content": system})
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                if text.count(_SENTINEL) != 1:
                    raise ValueError("the chat template does not place the user message verbatim; "
                                     "set data.prompt_format=human_assistant")
                head, tail = text.split(_SENTINEL)
            self._cache[system] = (head, tail)
        return self._cache[system]

    def render(self, sample: Sample) -> str:
        """The whole prompt as text, trigger included (what a generation engine sees)."""
        head, tail = self.head_tail(sample.system)
        return head + sample.user + tail

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_prompt(self, sample: Sample) -> tuple[list[int], list[int], list[int]]:
        """Token ids of (head + before, trigger, after + tail); the slot is after the first part."""
        head, tail = self.head_tail(sample.system)
        first = self._ids(head + sample.before)
        if self._bos and first[:1] != self._bos:
            first = self._bos + first
        return first, self._ids(sample.trigger), self._ids(sample.after + tail)

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The prompt as token ids, exactly as training sees it (engines take these, not text)."""
        a, b, c = self.encode_prompt(sample)
        return a + b + c

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id
