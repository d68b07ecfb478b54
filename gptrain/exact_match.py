"""Exact match on held-out conversations: does the chat model give the reference answer?

Each conversation's last assistant message is the question's answer: the model reads everything before it (up to
and including `<|assistant|>`, or the model's own template's generation prompt) and answers greedily, and the
answer counts when its tokens equal the reference's, up to and including the end token that closes it (`<|end|>`,
`<|im_end|>`, ...: so it must also stop). Only short answers are asked for: a long one can be right in other words,
and exact match would call it wrong.

Prompts of the same length are answered together, as one batch through the KV cache, and every batch generates a
fixed number of tokens (the longest reference of the batch), so every rank of a sharded model runs the same forward
passes in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

from gptrain.data.chat import check_messages
from gptrain.data.chat_batches import ChatSplit
from gptrain.data.jinja_chat import template_of
from gptrain.model import GPT

SHORT_ANSWER_TOKENS = 32  # the longest answer (with its end token) that exact match scores


@dataclass(frozen=True)
class Question:
    prompt: tuple[int, ...]  # the conversation before its last answer, ending with <|assistant|> or the like
    answer: tuple[int, ...]  # the reference answer's tokens and the end token that closes it


def last_answer(ids: np.ndarray, counted: np.ndarray) -> Question | None:
    """Split a conversation before its last answer: the last run of counted tokens (a model's own template may
    write a "\n" after the end token, which the loss does not count). None when it has no answer."""
    found = np.flatnonzero(counted)
    if not len(found):
        return None
    end = int(found[-1]) + 1
    uncounted = np.flatnonzero(~counted[:end])
    start = int(uncounted[-1]) + 1 if len(uncounted) else 0
    if start == 0:
        return None  # no prompt at all: nothing to answer
    return Question(tuple(ids[:start].tolist()), tuple(ids[start:end].tolist()))


def held_out_questions(split: ChatSplit, limit: int, block_size: int, step: int = 1) -> list[Question]:
    """The first `limit` conversations of the split whose last answer is short and fits, with its prompt, in
    block_size (the model must not slide its window while answering). step 2 takes every other conversation: the
    chosen answers of a preference dataset, not the rejected ones."""
    questions = []
    for index in range(0, split.conversations, step):
        if len(questions) == limit:
            break
        question = last_answer(*split.conversation(index))
        if (question and len(question.answer) <= SHORT_ANSWER_TOKENS
                and len(question.prompt) + len(question.answer) <= block_size):
            questions.append(question)
    return questions


def questions_from_conversations(tokenizer, records: list[dict]) -> list[Question]:
    """Questions from conversation records ({"messages": [...]}, as in a .jsonl file), each ending with the
    reference answer, through the chat template the model's tokenizer carries."""
    template = template_of(tokenizer)
    questions = []
    for record in records:
        ids, mask = template.render(check_messages(record))
        questions.append(last_answer(np.array(ids), np.array(mask, dtype=bool)))
    return questions


@torch.no_grad()
def answers(model: GPT, questions: list[Question], device: torch.device) -> list[tuple[int, ...]]:
    """The model's greedy answer to each question, as many tokens as its reference has."""
    found: dict[Question, tuple[int, ...]] = {}
    by_length = sorted(set(questions), key=lambda q: len(q.prompt))
    for _, group in groupby(by_length, key=lambda q: len(q.prompt)):
        group = list(group)
        prompts = torch.tensor([q.prompt for q in group], dtype=torch.long, device=device)  # (G, L)
        steps = max(len(q.answer) for q in group)
        generated = model.generate(prompts, steps, temperature=0.0)[:, prompts.size(1):].tolist()  # (G, steps)
        found.update((q, tuple(row[:len(q.answer)])) for q, row in zip(group, generated))
    return [found[q] for q in questions]


def exact_match_rate(model: GPT, questions: list[Question], device: torch.device) -> float:
    """The fraction of questions the model answers exactly as the reference does."""
    given = answers(model, questions, device)
    return sum(answer == q.answer for q, answer in zip(questions, given)) / len(questions)
