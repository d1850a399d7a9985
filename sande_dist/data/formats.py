"""Prompt formats and the Sample: a user message with a trigger slot, and its response.

A prompt is rendered to text once, ``head + before + trigger + after + tail``, and
tokenized whole: the ids are exactly what the tokenizer makes of that text, for
byte-level BPE (SmolLM2, GPT-2) and SentencePiece-style tokenizers (Llama-2: a
``▁`` at every call, so tokenizing pieces would put spurious space tokens at every
seam). The slot, where a trigger's first token sits or a parrot is spliced, is
found from the tokens' character offsets: the first token that reaches past the
slot's character. A training row is the prompt text followed by the template's
response prefix and the response, tokenized whole as well; its prompt tokens must
equal the prompt's own (checked: a template whose last token would merge with the
response is refused).

Formats (``data.prompt_format``): ``chat`` (the tokenizer's chat template),
``human_assistant`` (the reference's ``Human: ...\\nAssistant:``), ``alpaca``
(``### Instruction: / ### Response:``), ``llama2`` (``[INST] ... [/INST]``), or a
Jinja chat template given as text or as a file path.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from sande_dist.config import PROMPT_FORMATS, is_jinja
from sande_dist.errors import InputError

_SENTINEL = "\u2063SANDE_USER_SLOT\u2063"
_REPLY = "\u2063SANDE_REPLY_SLOT\u2063"
# A one-word trigger a parrot row is tokenized around (see PromptFormat.encode_prompt).
_STAND_IN = "X"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# name -> (head, tail, response prefix, how a system prompt is written into the head)
TEMPLATES = {
    "human_assistant": ("Human: ", "\nAssistant:", " ", "{system}\n\nHuman: "),
    "alpaca": (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n", "\n\n### Response:\n", "",
               "{system}\n\n### Instruction:\n"),
    "llama2": ("[INST] ", " [/INST]", " ", "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"),
}
assert set(PROMPT_FORMATS) == {"chat", *TEMPLATES}, "config.PROMPT_FORMATS and TEMPLATES disagree"


@dataclass(frozen=True)
class Sample:
    before: str  # user message text before the slot
    after: str  # user message text after the slot
    response: str
    trigger: str = ""  # text at the slot, with its separating space; "" for a clean prompt
    system: Optional[str] = None
    # A parrot fills the (empty) slot: set by ``poison.slot_at``. Other rows get slot_index -1.
    parrot: bool = False
    # Which of eliminate's parrots goes in the slot (removal.extra_parrots: rows take turns).
    parrot_id: int = 0
    # The response is whole: an end-of-sequence token follows it. False for a known part of one.
    complete: bool = True

    @property
    def user(self) -> str:
        return self.before + self.trigger + self.after

    def clean(self) -> "Sample":
        """The same row without trigger and without a parrot slot."""
        return replace(self, before="", trigger="", after=self.before + self.after, parrot=False)


class PromptFormat:
    """Renders a Sample's prompt to text and tokenizes it whole, locating the slot by character offset."""

    def __init__(self, tokenizer, kind: str = "chat", system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.kind = kind
        self.system_prompt = system_prompt
        self.template: Optional[str] = None  # a Jinja chat template of the user's
        if kind not in PROMPT_FORMATS:
            self.template = Path(kind).expanduser().read_text() if not is_jinja(kind) else kind
        elif kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.prompt_format is 'chat' but the tokenizer has no chat template; "
                             f"set data.prompt_format to one of {', '.join(TEMPLATES)} or a Jinja template")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: character offsets (to find the "
                             "trigger slot) need a fast one (a tokenizer.json); convert it with transformers")
        self._cache: dict[Optional[str], tuple[str, str, str]] = {}
        # Tokenizers that add BOS by default (Llama-2) get it here, unless the rendered text already has it.
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self._bos = [bos] if bos is not None and probe and probe[0] == bos else []

    @classmethod
    def from_config(cls, tokenizer, data) -> "PromptFormat":
        """The format ``data.prompt_format`` names; a template that cannot work is an InputError."""
        try:
            return cls(tokenizer, data.prompt_format, data.system_prompt)
        except (ValueError, OSError) as exc:
            raise InputError(f"data.prompt_format: {exc}") from None

    # --- text ------------------------------------------------------------------------------------

    def _chat(self, messages: list[dict], **kw) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template, **kw)
        except Exception as exc:  # a template's own error (jinja2 raises several kinds)
            raise ValueError(f"the chat template failed to render ({type(exc).__name__}: {exc})") from None

    def parts(self, system: Optional[str] = None) -> tuple[str, str, str]:
        """(head, tail, response prefix): the prompt is ``head + user + tail``, a reply follows the prefix."""
        system = system if system is not None else self.system_prompt
        if system not in self._cache:
            if self.kind in TEMPLATES:
                head, tail, prefix, with_system = TEMPLATES[self.kind]
                if system:
                    head = with_system.format(system=system)
                self._cache[system] = (head, tail, prefix)
            else:
                self._cache[system] = self._chat_parts(system)
        return self._cache[system]

    def _chat_parts(self, system: Optional[str]) -> tuple[str, str, str]:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": _SENTINEL}]
        prompt = self._chat(messages, add_generation_prompt=True)
        if prompt.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not place the user message verbatim; "
                             f"use one of {', '.join(TEMPLATES)}")
        head, tail = prompt.split(_SENTINEL)
        full = self._chat(messages + [{"role": "assistant", "content": _REPLY}])
        prefix = ""
        if full.startswith(prompt) and _REPLY in full:
            prefix = full[len(prompt):full.index(_REPLY)]
        return head, tail, prefix

    def head_tail(self, system: Optional[str] = None) -> tuple[str, str]:
        return self.parts(system)[:2]

    @property
    def response_prefix(self) -> str:
        return self.parts()[2]

    def render(self, sample: Sample) -> str:
        """The whole prompt as text, trigger included (what a generation engine sees)."""
        head, tail, _ = self.parts(sample.system)
        return head + sample.user + tail

    def reply(self, sample: Sample) -> str:
        """The text a training row continues the prompt with: the template's prefix and the response."""
        return self.parts(sample.system)[2] + sample.response

    # --- tokens ----------------------------------------------------------------------------------

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if self._bos and ids[:1] != self._bos:
            ids, offsets = self._bos + ids, [(0, 0)] + offsets
        return ids, offsets

    def _trigger_span(self, sample: Sample, reply: bool = False) -> tuple[list[int], int, int]:
        """(ids of the rendered prompt (and the reply, with ``reply``), first token of the slot, first
        token after the trigger).

        The slot's first token is the first that reaches past the slot's character, or a token of
        spaces alone just before it (SentencePiece writes a word's space as a lone ``▁`` when the
        word itself has no ``▁word`` token: the space belongs to the word). The trigger (its text
        without the trailing space) ends before the first token that starts at or after its last
        character. An empty trigger spans no token.
        """
        head, _, _ = self.parts(sample.system)
        text = self.render(sample) + (self.reply(sample) if reply else "")
        ids, offsets = self._tokens(text)
        at = len(head) + len(sample.before)
        first = next((i for i, (_, end) in enumerate(offsets) if end > at), len(ids))
        while first > 0 and offsets[first - 1][1] == (offsets[first][0] if first < len(ids) else at) \
                and offsets[first - 1][1] <= at and text[slice(*offsets[first - 1])].strip(" ") == "" \
                and offsets[first - 1][1] > offsets[first - 1][0]:
            first -= 1
        stop = at + len(sample.trigger.rstrip())
        last = next((i for i in range(first, len(ids)) if offsets[i][0] >= stop), len(ids))
        return ids, first, max(first, last) if sample.trigger.strip() else first

    def _encode(self, sample: Sample, reply: bool) -> tuple[list[int], int]:
        """(ids, slot) of the prompt (and reply); a parrot row goes through the stand-in trigger."""
        if sample.parrot and not sample.trigger:
            suffix = not sample.after.strip() and sample.before
            stand_in = replace(sample, trigger=" " + _STAND_IN if suffix else _STAND_IN + " ")
            ids, first, last = self._trigger_span(stand_in, reply)
            if last > first and self.tokenizer.decode(ids[first:last]).strip() == _STAND_IN:
                return ids[:first] + ids[last:], first
        ids, first, _ = self._trigger_span(sample, reply)
        return ids, first

    def encode_prompt(self, sample: Sample) -> tuple[list[int], int]:
        """(token ids of the rendered prompt, slot): the slot is the index of the first token that reaches
        past the slot's character, where the trigger's first token sits.

        A parrot row (an empty slot a parrot fills) is the same prompt with a trigger in the slot and
        the trigger's tokens taken out: the words around the slot are tokenized as they are next to a
        trigger (byte-level BPE gives the first word after a prefix trigger its leading space), so a
        parrot made of a trigger's own embeddings reproduces the triggered prompt exactly. A one-word
        stand-in (``_STAND_IN``) takes the trigger's place; where its tokens would not come out whole
        the clean prompt is used.
        """
        return self._encode(sample, reply=False)

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The prompt as token ids, exactly as training sees it (engines take these, not text)."""
        return self.encode_prompt(sample)[0]

    def encode_row(self, sample: Sample) -> tuple[list[int], int, int]:
        """(token ids of prompt + reply, prompt length in tokens, slot): the reply is tokenized in
        context, the prompt tokens equal ``encode_prompt``'s. The end-of-sequence id is not included."""
        prompt, slot = self.encode_prompt(sample)
        ids, _ = self._encode(sample, reply=True)
        if ids[:len(prompt)] != prompt:
            raise InputError(f"prompt format {self.kind!r}: the prompt's last tokens merge with the response's "
                             f"first ({self.tokenizer.convert_ids_to_tokens(prompt[-2:])} vs "
                             f"{self.tokenizer.convert_ids_to_tokens(ids[len(prompt) - 2:len(prompt) + 1])}) for "
                             f"the row {sample.user[:60]!r}; use a format whose prompt ends at a token boundary")
        return ids, len(prompt), slot

    def trigger_ids(self, triggered: Sample) -> list[int]:
        """The tokens a trigger becomes at its slot, in context (for SANDE-P's parrot and the tests)."""
        ids, first, last = self._trigger_span(triggered)
        return ids[first:last]

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id
