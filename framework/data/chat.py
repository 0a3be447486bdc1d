"""Chat conversations as token ids and a per-token loss mask: which tokens are the assistant's.

A conversation is rendered with the tokenizer's own chat template (or `data.chat_template`). With
`loss_on="assistant"` only the assistant's tokens carry labels: each assistant turn's content and its
end-of-turn marker, never the next turn's header or the user's and system's text. Where the template marks
the assistant's text itself (`{% generation %}` ... `{% endgeneration %}`), transformers' own mask is used.
Otherwise the spans come from rendering prefixes of the conversation: an assistant turn k spans from the end
of `render(messages[:k], add_generation_prompt=True)` (its header) to the end of `render(messages[:k+1])`,
trailing whitespace dropped (the newline some templates put after the end-of-turn token belongs to no one).
That holds for every template that renders a conversation as the concatenation of its turns (ChatML / Qwen /
SmolLM2, Llama 3, Gemma, Mistral's [INST] form). A template that does not (one that rewrites earlier turns,
e.g. drops past reasoning) falls back to finding each assistant message's text in the rendering, plus the
special token right after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sapling.errors import DataError

LOSS_ON = ("assistant", "all")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")  # the template marks the assistant's text itself
# `conversations` rows (ShareGPT style) name roles with these; anything else is kept as given.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system",
                 "user": "user", "assistant": "assistant"}


def normalize_messages(row: Mapping[str, Any], field: str = "messages", role_key: str | None = None,
                       content_key: str | None = None) -> list[dict[str, str]]:
    """`row[field]` as [{"role", "content"}]: `role`/`content` entries, or ShareGPT's `from`/`value` (`human`,
    `gpt` -> user, assistant); other key names with `role_key` / `content_key`. A malformed row is a DataError
    naming the field."""
    turns = row.get(field)
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        raise DataError(f"chat row has no non-empty list in {field!r} (keys: {sorted(row)}); fix: set "
                        "data.messages_field to the field holding the conversation")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(f"{field}[{i}] is a {type(turn).__name__}, not an object with a role and a content")
        rk = role_key or ("role" if "role" in turn else "from")
        ck = content_key or ("content" if "content" in turn else "value")
        if rk not in turn or ck not in turn or not isinstance(turn[ck], str):
            raise DataError(f"{field}[{i}] lacks {rk!r} or a text {ck!r} (keys: {sorted(turn)}); fix: set "
                            "data.role_key / data.content_key to this data's names")
        role = str(turn[rk])
        out.append({"role": _ROLE_ALIASES.get(role.lower(), role), "content": turn[ck]})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str | None,
                     text: str) -> list[tuple[int, int, bool]]:
    """Character spans of the assistant turns in the rendered `text`: (start, end, whether the span came from
    the prefix renderings, so includes the end-of-turn marker)."""
    spans = []
    cursor = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:k], template, True) if k else ""
        turn = _render(tokenizer, messages[: k + 1], template, False)
        verbatim = turn.startswith(head) and text.startswith(turn) and len(turn) > len(head)
        if verbatim:
            start, end = len(head), len(turn.rstrip())
        else:  # a template that rewrites earlier turns: the message's text itself
            start = text.find(m["content"], cursor)
            if start < 0:
                raise DataError(f"assistant turn {k} is not in the rendered conversation (the chat template changes "
                                "its text); fix: use a template that renders assistant messages verbatim, or "
                                "data.loss_on=all")
            end = start + len(m["content"])
        spans.append((start, end, verbatim))
        cursor = end
    return spans


def render_chat(messages: list[dict[str, str]], tokenizer: Any, *, chat_template: str | None = None,
                loss_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """(token ids, per-token label flags) of `messages` rendered with `chat_template` (default: the
    tokenizer's). `loss_on="all"` labels every token; "assistant" the assistant turns only (module docstring)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    template = chat_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; fix: pass data.chat_template=<a Jinja template (or a "
                        "file holding one)>, or use a tokenizer that has one")
    text = _render(tokenizer, messages, template, False)
    source = template or tokenizer.chat_template
    if loss_on == "assistant" and isinstance(source, str) and _GENERATION.search(source):
        enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [bool(x) for x in enc["assistant_masks"]]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if loss_on == "all":
        return ids, [True] * len(ids)
    spans = _assistant_spans(tokenizer, messages, template, text)
    mask = [False] * len(ids)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for start, end, verbatim in spans:
        inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
        for i in inside:
            mask[i] = True
        if inside and not verbatim and inside[-1] + 1 < len(ids) and ids[inside[-1] + 1] in special:
            mask[inside[-1] + 1] = True  # the end-of-turn token right after the message's text
    return ids, mask


@dataclass(frozen=True)
class ChatFormat:
    """How chat rows are read and labelled (`data.messages_field`, `data.role_key`, `data.content_key`,
    `data.chat_template`: Jinja text, `data.loss_on`)."""

    messages_field: str = "messages"
    role_key: str | None = None
    content_key: str | None = None
    chat_template: str | None = None
    loss_on: str = "assistant"

    def key(self) -> dict[str, Any]:
        """What the tokens depend on, for the packed-data fingerprint."""
        template = None if self.chat_template is None else hashlib.sha256(self.chat_template.encode()).hexdigest()
        return {"messages_field": self.messages_field, "role_key": self.role_key, "content_key": self.content_key,
                "chat_template": template, "loss_on": self.loss_on}


CHAT_FILE_KINDS = (".jsonl", ".json", ".parquet")


def template_text(value: str | None) -> str | None:
    """`data.chat_template` as Jinja text: the file's content when it names a file, else the value itself."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if "{" not in value and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return value


def read_chat_rows(path: str, field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of every conversation in a .jsonl/.json (one JSON object per line, or one JSON array of them)
    or .parquet file; `where` names the file and line for errors."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CHAT_FILE_KINDS:
        raise DataError(f"{path}: chat data must be {'/'.join(CHAT_FILE_KINDS)} rows holding {field!r}; fix: convert "
                        "it, or set data.format=text for plain text files")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if field not in names:
            raise DataError(f"{path}: no column {field!r} (columns: {names}); fix: set data.messages_field to the "
                            "column that holds the conversations")
        for i, value in enumerate(pq.read_table(path, columns=[field]).column(field).to_pylist()):
            yield f"{path} row {i}", {field: value}
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # one JSON array of rows
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err}); fix: write one JSON object per line") from err
            for i, row in enumerate(rows):
                yield f"{path} item {i}", row
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {n}: not valid JSON ({err.msg}); fix: write one JSON object per "
                                "line") from err
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: a JSON {type(row).__name__}, not an object with {field!r}")
            yield f"{path} line {n}", row


def tokenize_conversations(rows: Iterable[tuple[str, Mapping[str, Any]]], tokenizer: Any, fmt: ChatFormat,
                           batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(flat token ids, per-conversation lengths, flat label flags) for every `batch` conversations of `rows`."""
    ids: list[int] = []
    mask: list[bool] = []
    lengths: list[int] = []
    for where, row in rows:
        try:
            messages = normalize_messages(row, fmt.messages_field, fmt.role_key, fmt.content_key)
            conv_ids, conv_mask = render_chat(messages, tokenizer, chat_template=fmt.chat_template,
                                              loss_on=fmt.loss_on)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        ids += conv_ids
        mask += conv_mask
        lengths.append(len(conv_ids))
        if len(lengths) >= batch:
            yield np.asarray(ids, np.int64), np.asarray(lengths, np.int64), np.asarray(mask, bool)
            ids, mask, lengths = [], [], []
    if lengths:
        yield np.asarray(ids, np.int64), np.asarray(lengths, np.int64), np.asarray(mask, bool)
