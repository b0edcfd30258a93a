"""Task accuracy offline, on any local text: the hubs that hold LAMBADA, HellaSwag & co. are out of reach here.

Items are built deterministically from the text (same file, same tokenizer -> same items):
- last-word (LAMBADA-style): a passage ending at the last word of a sentence; the model is right when greedy
  decoding reproduces every token of that word (each target token is the argmax after the tokens before it).
- cloze (multiple choice): the same passage with its last word and `choices - 1` distractors, the last words of
  other items (so they are plausible words of the same text); the model picks the choice of highest total
  log-probability after the context.
Both are scored from one batched forward pass per item (the choices, right-padded), so a model costs
`items` forward passes of about `context_words` tokens.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.calibration.text import read_text
from lowbit.errors import LowbitError

TASKS = ("last_word", "cloze")
WORD = re.compile(r"^[A-Za-z]{3,}$")
SEPARATE_STOPS = {".", "!", "?"}
SENTENCE_END = re.compile(r"^(.*?[A-Za-z]{3,})([.!?][\"')\]]*)$")


@dataclass(frozen=True)
class TaskItem:
    context: str              # the words before the target, without a trailing space
    target: str               # the target word (scored as " " + target)
    distractors: tuple[str, ...]


@dataclass
class TaskResult:
    task: str
    accuracy: float
    correct: int
    items: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_items(text: str, n_items: int = 200, context_words: int = 64, choices: int = 4) -> list[TaskItem]:
    """`n_items` passages spread evenly over the text, each ending at a sentence's last word (letters only, three
    or more), with `context_words` words of context from the same paragraph; wikitext headings are skipped."""
    candidates: list[tuple[str, str]] = []
    for paragraph in text.split("\n"):
        paragraph = paragraph.strip()
        if not paragraph or paragraph.startswith("="):
            continue
        words = paragraph.split()
        for i, word in enumerate(words):
            if i < context_words // 2:
                continue
            match = SENTENCE_END.match(word)
            # "end." or, in tokenized corpora such as wikitext, "end ."
            if match is not None:
                target = match.group(1)
            elif i + 1 < len(words) and words[i + 1] in SEPARATE_STOPS:
                target = word
            else:
                continue
            if WORD.match(target):
                candidates.append((" ".join(words[max(0, i - context_words):i]), target))
    if len(candidates) < max(n_items, choices):
        raise LowbitError(f"the text yields {len(candidates)} sentence-final words with {context_words // 2}+ words "
                          f"of context, fewer than the {n_items} task items asked for; use a longer text or fewer "
                          "--task-items")
    stride = len(candidates) / n_items
    picked = [candidates[int(i * stride)] for i in range(n_items)]
    targets = [t for _, t in picked]
    items = []
    for i, (context, target) in enumerate(picked):
        # Distractors: the next items' targets (deterministic), skipping ones equal to this target
        distractors: list[str] = []
        j = i
        while len(distractors) < choices - 1:
            j = (j + 7) % len(targets)
            if targets[j].lower() != target.lower() and targets[j] not in distractors:
                distractors.append(targets[j])
        items.append(TaskItem(context, target, tuple(distractors)))
    return items


def items_from_file(path: str | Path, n_items: int = 200, context_words: int = 64) -> list[TaskItem]:
    return build_items(read_text(path), n_items, context_words)


def _prefix_token(tokenizer) -> int:
    """The token a continuation with no context is scored after: BOS, else EOS (as lm-evaluation-harness does)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    raise LowbitError("an empty context needs a BOS or EOS token to condition on, and this tokenizer has neither")


@torch.no_grad()
def continuation_scores(model, tokenizer, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
    """(total log-probability, greedy?) of each continuation after `context`, in one right-padded batch.

    Context and continuations are tokenized apart, so every continuation is scored after the same context tokens;
    `greedy` is True when each continuation token is the argmax after the tokens before it."""
    if tokenizer is None:
        raise LowbitError("task accuracy needs the model's tokenizer; this model has none")
    ctx = tokenizer(context, add_special_tokens=False).input_ids if context else []
    ctx = ctx or [_prefix_token(tokenizer)]
    conts = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    if any(not c for c in conts):
        raise LowbitError("a continuation tokenizes to nothing; every choice must hold some text")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(conts), len(ctx) + max(len(c) for c in conts)), pad, dtype=torch.long)
    for row, cont in enumerate(conts):
        batch[row, :len(ctx) + len(cont)] = torch.tensor(ctx + cont)
    logp = F.log_softmax(model(batch, use_cache=False).logits.float(), dim=-1)
    out = []
    for row, cont in enumerate(conts):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        targets = torch.tensor(cont)
        out.append((logp[row, positions, targets].sum().item(),
                    bool((logp[row, positions].argmax(-1) == targets).all())))
    return out


def score_items(model, tokenizer, items: list[TaskItem], progress: bool = True) -> dict[str, TaskResult]:
    """Last-word and cloze accuracy of `model` on `items`: one batched forward pass per item."""
    last_word = cloze = 0
    for item in tqdm(items, desc="tasks", unit="item", disable=not progress):
        scores = continuation_scores(model, tokenizer, item.context,
                                     [" " + word for word in (item.target, *item.distractors)])
        last_word += int(scores[0][1])
        cloze += int(max(range(len(scores)), key=lambda i: scores[i][0]) == 0)
    n = len(items)
    return {"last_word": TaskResult("last_word", last_word / n, last_word, n),
            "cloze": TaskResult("cloze", cloze / n, cloze, n)}
