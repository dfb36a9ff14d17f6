"""The causal-LM task's data: prompt/response pairs, their tokens, held-out loss and generations (no Flower).

A row is a prompt (a list of chat messages) and the response the model learns. Rows are rendered with the
tokenizer's chat template when it has one, and the loss counts the response tokens only. Tokens are made on
demand and kept per row, so a node with 60,000 rows tokenizes only the few dozen it trains on each round.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import nn

from .training import PAD_MULTIPLE, autocast

IGNORE = -100  # the label torch's cross-entropy skips: prompt and padding positions
CHITCHAT_PACKAGE = "chitchat_dataset"
NO_TOPIC = "(none)"
#: How many rows of training samples are sorted by length together (as transformers' LengthGroupedSampler):
#: batches of similar length pad little, and the mega-batches keep the order random across rounds.
LENGTH_GROUP_BATCHES = 8


class ChatDataError(ValueError):
    """Bad causal-LM data (names the column or row and what is allowed)."""


@functools.lru_cache(maxsize=1)
def load_chitchat() -> datasets.Dataset:
    """The Chit Chat Challenge corpus of the ``chitchat-dataset`` wheel as message -> reply pairs.

    7,168 conversations between two people give 131,569 rows: each turn (a speaker's consecutive messages,
    joined by spaces) is a prompt, and the next turn the response. Columns: ``prompt``, ``response``,
    ``topic`` (the question the conversation was opened with, one of 35, ``(none)`` for 239 conversations)
    and ``conversation`` (its id, so that a held-out split takes whole conversations).
    """
    spec = importlib.util.find_spec(CHITCHAT_PACKAGE)  # its __init__ would parse the 40 MB file at import
    if spec is None or not spec.submodule_search_locations:
        raise ChatDataError("The default causal-lm dataset needs the 'chitchat-dataset' package: "
                            "pip install chitchat-dataset")
    from .data import clean_text

    with open(Path(spec.submodule_search_locations[0]) / "dataset.json", encoding="utf-8") as handle:
        conversations = json.load(handle)
    columns: dict[str, list[str]] = {"prompt": [], "response": [], "topic": [], "conversation": []}
    for conversation_id, conversation in conversations.items():
        turns = [clean_text(" ".join(u["text"] for u in turn)) for turn in conversation["messages"]]
        for prompt, response in zip(turns, turns[1:]):
            columns["prompt"].append(prompt)
            columns["response"].append(response)
            columns["topic"].append(conversation.get("prompt") or NO_TOPIC)
            columns["conversation"].append(conversation_id)
    return datasets.Dataset.from_dict(columns)


def normalise(ds: datasets.Dataset, prompt_column: str, response_column: str, messages_column: str,
              keep: Sequence[str]) -> datasets.Dataset:
    """Columns ``prompt`` (a JSON list of chat messages), ``response`` (str) and those of ``keep`` present.

    Rows come from ``prompt_column`` + ``response_column`` (plain text) when both exist, else from a chat
    ``messages_column`` whose last message is the assistant's reply.

    Raises
    ------
    ChatDataError
        When neither form is there, or a chat row does not end with an assistant message.
    """
    names = ds.column_names
    extra = [c for c in dict.fromkeys(keep) if c in names]
    if prompt_column in names and response_column in names:
        def rows(batch):
            pairs = list(zip(batch[prompt_column], batch[response_column]))
            if any(p is None or r is None for p, r in pairs):
                raise ChatDataError(f"a row has no {prompt_column!r} or no {response_column!r}: "
                                    f"{next(pair for pair in pairs if None in pair)}")
            return {"prompt": [json.dumps([{"role": "user", "content": str(p)}]) for p, _ in pairs],
                    "response": [str(r) for _, r in pairs]}
    elif messages_column in names:
        def rows(batch):
            prompts, responses = [], []
            for chat in batch[messages_column]:
                if len(chat or []) < 2 or not isinstance(chat[-1], dict) or chat[-1].get("role") != "assistant":
                    raise ChatDataError(f"a {messages_column!r} row must hold a prompt and end with an assistant "
                                        f"message, got {str(chat)[:200]}")
                prompts.append(json.dumps([{"role": m["role"], "content": m["content"]} for m in chat[:-1]]))
                responses.append(str(chat[-1]["content"]))
            return {"prompt": prompts, "response": responses}
    else:
        raise ChatDataError(
            f"causal-lm needs the columns prompt-column = {prompt_column!r} and response-column = "
            f"{response_column!r}, or a chat column messages-column = {messages_column!r}; this data has "
            f"{names}")
    kept = ds.select_columns([c for c in (prompt_column, response_column, messages_column) if c in names] + extra)
    out = kept.map(rows, batched=True, remove_columns=[c for c in kept.column_names if c not in extra])
    return out.select_columns(["prompt", "response", *extra])


def split_by_group(ds: datasets.Dataset, test_size: int, seed: int, group: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, test rows)``: ``test_size`` rows of whole groups (``group`` column, e.g. conversations)
    drawn at random, so that no held-out reply shares a conversation with a training row. Rows of the last
    group drawn beyond ``test_size`` are in neither. Without the column, rows are drawn one by one."""
    rng = np.random.default_rng(seed)
    if group not in ds.column_names:
        order = rng.permutation(len(ds))
        return np.sort(order[test_size:]), order[:test_size]
    ids = np.asarray(ds.with_format("arrow")[group].to_pylist(), dtype=object)
    groups = rng.permutation(np.unique(ids))
    test, taken = [], 0
    members = {g: [] for g in groups}
    for row, g in enumerate(ids):
        members[g].append(row)
    held_out_groups = set()
    for g in groups:
        if taken >= test_size:
            break
        rows = members[g][: test_size - taken]
        test.extend(rows)
        taken += len(rows)
        held_out_groups.add(g)
    train = np.array([row for row, g in enumerate(ids) if g not in held_out_groups], dtype=np.int64)
    return rng.permutation(train), np.array(test, dtype=np.int64)


def encode_row(tokenizer, prompt: list[dict], response: str, max_len: int) -> tuple[list[int], int]:
    """``(token ids, prompt length)`` of one row: the chat template's rendering of the prompt (ending with the
    assistant's turn opening) and of the reply after it; without a template, the prompt's text, a newline, the
    reply and the end-of-sequence token. Over ``max_len``, the prompt loses tokens from the left and the reply
    from the right (the reply keeps at least half)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = (_ids(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True))
            if tokenizer.chat_template else [])
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        response_ids = full[len(prompt_ids):]
    else:  # no template, or one that renders the history differently once answered: the reply's own tokens
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[:max(max_len - len(prompt_ids), max_len // 2)]
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_len - len(response_ids)):]
    return prompt_ids + response_ids, len(prompt_ids)


def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """The prompt's token ids, up to where the reply starts: the chat template with the assistant's turn opened,
    or without one the messages' text and a newline."""
    if tokenizer.chat_template:
        return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    return tokenizer("\n".join(m["content"] for m in prompt) + "\n")["input_ids"]


def _ids(rendered) -> list[int]:
    """Token ids from ``apply_chat_template(tokenize=True)``: a list, or a BatchEncoding in transformers 5."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


class ChatRows:
    """Prompt/response rows ready for batching: ``batch(indices)`` gives ``input_ids``, ``attention_mask`` and
    ``labels`` (the response tokens; prompt and padding are :data:`IGNORE`). Rows are tokenized on first use."""

    def __init__(self, prompts: Sequence[str], responses: Sequence[str], tokenizer, max_len: int):
        self.prompts, self.responses = list(prompts), list(responses)
        self.tokenizer, self.max_len = tokenizer, max_len
        self._tokens: dict[int, tuple[list[int], int]] = {}

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset, tokenizer, max_len: int) -> ChatRows:
        return cls(dataset["prompt"], dataset["response"], tokenizer, max_len)

    def __len__(self) -> int:
        return len(self.prompts)

    def tokens(self, row: int) -> tuple[list[int], int]:
        """``(token ids, prompt length)`` of ``row``."""
        if row not in self._tokens:
            self._tokens[row] = encode_row(self.tokenizer, json.loads(self.prompts[row]), self.responses[row],
                                           self.max_len)
        return self._tokens[row]

    def subset(self, indices: Sequence[int]) -> ChatRows:
        pick = list(indices)
        return ChatRows([self.prompts[i] for i in pick], [self.responses[i] for i in pick], self.tokenizer,
                        self.max_len)

    def by_length(self) -> list[int]:
        return sorted(range(len(self)), key=lambda i: len(self.tokens(i)[0]))

    def training_order(self, order: Sequence[int], batch_size: int) -> list[int]:
        """``order`` with each run of ``LENGTH_GROUP_BATCHES`` batches sorted by length (longest first, so a
        round's peak memory shows in its first step)."""
        size = batch_size * LENGTH_GROUP_BATCHES
        grouped = []
        for first in range(0, len(order), size):
            grouped += sorted(order[first:first + size], key=lambda i: -len(self.tokens(i)[0]))
        return grouped

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.tokens(i) for i in indices]
        width = -(-max(len(ids) for ids, _ in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for k, (ids, prompt_len) in enumerate(rows):
            input_ids[k, :len(ids)] = torch.tensor(ids)
            mask[k, :len(ids)] = 1
            labels[k, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.inference_mode()
def evaluate_lm(model: nn.Module, data: ChatRows, *, batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Held-out ``loss`` (mean cross-entropy per response token, over all rows' tokens) and ``perplexity``."""
    model.to(device).eval()
    order = data.by_length()
    total, tokens = 0.0, 0
    for first in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(order[first:first + batch_size]).items()}
        # The model's own loss (float32 cross-entropy on the shifted labels, as in training) is the batch's mean
        # over its reply tokens: times their count, the batch's sum. No float32 copy of the vocabulary-wide logits.
        count = int((batch["labels"][:, 1:] != IGNORE).sum())
        with autocast(device, dtype):
            loss = model(**batch).loss
        total, tokens = total + float(loss) * count, tokens + count
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.inference_mode()
def generate_replies(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                     max_len: int, device: torch.device) -> list[str]:
    """Greedy replies to ``prompts`` (JSON chat messages), one at a time (no padding to get wrong)."""
    model.to(device).eval()
    replies = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, json.loads(prompt))[-max_len:]
        inputs = torch.tensor([ids], device=device)
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return replies
