"""SEED-Bench's official inference: rank the choices of each question by the LM loss of each as the answer.

SEED-Bench's own evaluation (benchmarks.md §6) does not let the model generate: for every choice it takes the
loss of the choice text as the continuation of ``Question: {q}\\nAnswer:``, the mean over the answer's tokens
(the causal-LM loss of the answer, as its ``eval.py`` computes it), and predicts the choice with the lowest
loss. ``likelihood_predictions`` does that for an inference dataset of multiple-choice records
(``metadata["choices"]``: letter -> choice text, as ``moka_train.data.datasets.seed_bench`` writes them):

- the prompt (``prompt``): ``"official"`` replaces the question span of the record's user turn (the question
  block with its options and instruction) by ``Question: {q}\\nAnswer:``, the media and the chat frame staying
  as the record has them; ``"benchmark"`` keeps the record's user turn as it is;
- the response: the choice text, as the assistant turn; of the tokens the collator supervises, those the chat
  template writes after the text (its end-of-turn token) are left out (``template_tail_tokens``), so the loss
  is over the choice's tokens alone, as in the official code;
- the loss: ``choice_losses``, each sample's summed cross-entropy over its label tokens divided by their
  count;
- batching: ``batch_size`` questions per forward, i.e. ``batch_size * len(choices)`` samples sharing the
  question's media; the ranks shard the questions as ``generate_predictions`` does (rank r of w takes
  ``r, r + w, ...``), so ``gather_predictions`` merges them.

One record per question, as ``generate_predictions`` writes them, plus ``losses`` (letter -> mean loss)::

    {"index": 0, "id": "seed_bench/101669", "prediction": "A", "answer": "(A)", "losses": {"A": 1.2, ...}, ...}

``prediction`` is the bare letter (what the SEED-Bench scorer's ``official`` rule reads). A question with a
choice too long for the collator's ``max_length`` (``on_overflow="drop"``) gets an empty prediction and
``"dropped": True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from moka_train.data.collate import MultimodalCollator, batch_to_device
from moka_train.data.sample import Sample
from moka_train.evaluation.generate import _fits, _model_device, check_inference_inputs, shard_indices, target_text
from moka_train.models.mllm import IGNORE_INDEX

PROMPTS = ("official", "benchmark")
OFFICIAL_QUESTION = "Question: {question}\nAnswer:"  # SEED-Bench's eval prompt


def choice_sample(sample: Sample, choice: str, prompt: str = "official") -> Sample:
    """``sample`` (an inference sample: its turns end with the user's) with ``choice`` as the assistant's answer;
    under ``prompt="official"`` the question span of its user turn holds ``Question: {q}\\nAnswer:`` instead."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    messages = [dict(turn) for turn in sample.messages]
    if not messages or messages[-1].get("role") != "user":
        raise ValueError(f"sample {sample.id!r}: expected turns ending with the user's (an inference sample)")
    span = sample.question_span
    if prompt == "official":
        question = sample.metadata.get("question")
        if question is None or span is None:
            raise ValueError(
                f"sample {sample.id!r}: the official prompt needs metadata['question'] and a question span"
            )
        start, end = span
        text = OFFICIAL_QUESTION.format(question=question)
        messages[-1]["content"] = messages[-1]["content"][:start] + text + messages[-1]["content"][end:]
        span = (start, start + len(text))
    messages.append({"role": "assistant", "content": choice})
    return dataclasses.replace(sample, messages=messages, question_span=span)


def template_tail_tokens(collator: MultimodalCollator, sample: Sample) -> int:
    """How many of the training ``sample``'s supervised tokens the chat template writes after the answer text (the
    end-of-turn token: ``</s>``, ChatML's ``<|im_end|>``): the same for every choice, and no part of it."""
    text, prompt_end, response_end = collator.render(sample)
    answer = sample.messages[-1]["content"]
    start = text.find(answer, prompt_end)
    if start < 0:  # a template that strips the answer (Llama-3's | trim)
        answer = answer.strip()
        start = text.find(answer, prompt_end)
    if start < 0:
        raise ValueError(f"sample {sample.id!r}: the chat template changed the answer text, so its tokens are unknown")
    answer_end = start + len(answer)
    offsets = collator.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    return sum(1 for first, last in offsets if last > prompt_end and answer_end <= first < response_end)


def drop_template_tails(labels: Tensor, tails: Sequence[int]) -> None:
    """Each row's last ``tails[row]`` label tokens (the response's end) set to ignored, in place."""
    for row, tail in enumerate(tails):
        if tail:
            supervised = (labels[row] != IGNORE_INDEX).nonzero().flatten()
            labels[row, supervised[-tail:]] = IGNORE_INDEX


def choice_losses(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The mean cross-entropy over each row's label tokens (position t predicting t + 1), shape [rows]."""
    logits = model(batch).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(-1)
    return losses.sum(-1) / counts.clamp(min=1)


def likelihood_predictions(
    model: nn.Module,
    dataset: Any,
    collator: MultimodalCollator,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    prompt: str = "official",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """This rank's shard of ``dataset`` (built with ``inference=True``), each question predicted as its
    lowest-loss choice; see the module docstring. The model runs in eval mode under ``torch.no_grad``."""
    check_inference_inputs(dataset, batch_size, "likelihood_predictions")
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    indices = shard_indices(len(dataset), rank, world_size)
    records = getattr(dataset, "records", None)
    device = _model_device(model)
    predictions: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(indices), batch_size)
            for start in tqdm(starts, desc="ranking choices", unit="batch", disable=not progress or rank != 0):
                chunk = indices[start : start + batch_size]
                questions = [(index, dataset[index]) for index in chunk]
                kept: list[tuple[int, Sample, list[str], list[Sample]]] = []
                for index, sample in questions:
                    choices = sample.metadata.get("choices")
                    if not isinstance(choices, Mapping) or not choices:
                        raise ValueError(f"sample {sample.id!r}: no metadata['choices'] (letter -> text) to rank")
                    letters = list(choices)
                    options = [choice_sample(sample, str(choices[letter]), prompt) for letter in letters]
                    if all(_fits(collator, option) for option in options):
                        kept.append((index, sample, letters, options))
                losses = iter([])
                if kept:
                    samples = [option for *_, options in kept for option in options]
                    batch = collator(samples)
                    drop_template_tails(batch["labels"], [template_tail_tokens(collator, o) for o in samples])
                    losses = iter(choice_losses(model, batch_to_device(batch, device)).cpu().tolist())
                ranked = {index: {letter: next(losses) for letter in letters} for index, _, letters, _ in kept}
                for index, sample in questions:
                    record = records[index] if records is not None else sample
                    by_letter = ranked.get(index)
                    predictions.append(
                        {
                            **dict(sample.metadata),
                            "index": index,
                            "id": sample.id,
                            "prediction": min(by_letter, key=by_letter.get) if by_letter else "",
                            "answer": target_text(record),
                            **({"losses": by_letter} if by_letter else {"dropped": True}),
                        }
                    )
    finally:
        model.train(was_training)
    return predictions
