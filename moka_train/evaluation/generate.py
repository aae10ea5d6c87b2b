"""Greedy answers for every question of an inference dataset, sharded over the ranks of a run.

``generate_predictions`` batches the dataset's samples (prompts rendered with the generation prompt, left-padded),
runs ``MultimodalLM.generate`` and decodes the new tokens. Rank r of w takes the indices ``r, r + w, r + 2w, ...``:
every question is answered exactly once over the ranks (no padding duplicates), so ``gather_predictions``
simply concatenates the ranks' lists and sorts them back into dataset order. ``write_predictions`` writes them
as JSONL, atomically.

One prediction per question::

    {"index": 3, "id": "music_avqa/test/4", "prediction": "two", "raw_output": "two</s>", "answer": "two", ...}

``prediction`` is the answer decoded without special tokens and stripped; ``raw_output`` the same tokens up to and
including the stop token, decoded with special tokens kept and not stripped (as MokA's evaluation scripts decode,
``batch_decode(..., skip_special_tokens=False)``: its scoring rules read that text, e.g. ``"A </s>"``).

``answer`` is the record's target text (its final assistant turn, which the inference dataset drops from the
prompt; ``<answer>X</answer>`` for a tagged target), falling back to ``metadata["answer"]`` for a record without
one; it replaces a metadata field of the same name. A sample too long for the collator's ``max_length`` (with
``on_overflow="drop"``) is not generated for but still gets its entry, with an empty prediction and
``"dropped": True``, so it counts as wrong instead of vanishing from the denominator.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moka_train.checkpoint_io import write_text_atomic
from moka_train.data.collate import MultimodalCollator, batch_to_device
from moka_train.models.mllm import zero3_partitioned


def target_text(record: Any) -> str | None:
    """The record's target: its final assistant turn, else ``metadata["answer"]``, else None."""
    messages = getattr(record, "messages", None) or []
    if messages and messages[-1].get("role") == "assistant":
        return messages[-1]["content"]
    answer = (getattr(record, "metadata", None) or {}).get("answer")
    return None if answer is None else str(answer)


def shard_indices(length: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The dataset indices rank ``rank`` of ``world_size`` answers: ``range(rank, length, world_size)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return list(range(rank, length, world_size))


def check_inference_inputs(dataset: Any, batch_size: int, caller: str) -> None:
    """What every answering loop needs: prompts without their answer turn, and a positive int batch size."""
    if getattr(dataset, "inference", True) is not True:
        raise ValueError(f"{caller} needs a dataset built with inference=True (prompts without the answer turn)")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _fits(collator: MultimodalCollator, sample: Any) -> bool:
    """Whether the collator keeps ``sample``: with ``on_overflow="drop"`` it is checked here, before collating,
    so that a batch of only too-long samples is skipped rather than refused (``"error"``: the collator raises)."""
    if collator.max_length is None or collator.on_overflow != "drop":
        return True
    length = len(collator.encode(sample))
    if length <= collator.max_length:
        return True
    warnings.warn(
        f"sample {sample.id!r} is {length} tokens long with its media expanded, over max_length "
        f"{collator.max_length}: no prediction (counted as wrong)",
        stacklevel=3,
    )
    return False


def _filler(dataset: Any, indices: Sequence[int], collator: MultimodalCollator) -> Any:
    """A sample to generate on and discard: this rank's first that fits, else the dataset's first."""
    for index in [*indices, 0]:
        sample = dataset[index]
        if collator.max_length is None or len(collator.encode(sample)) <= collator.max_length:
            return sample
    return sample


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The ids generation stops at: the backbone checkpoint's own (an instruct model's end-of-turn id among them,
    e.g. LLaMA-3's <|eot_id|> beside <|end_of_text|>) and the tokenizer's EOS. The tokenizer's alone misses the
    end of turn where it names the end of text, and answers would run on to max_new_tokens."""
    llm = getattr(model, "llm", model)
    configured = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else [int(i) for i in configured]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


# Settings that only shape sampling: under greedy decoding transformers ignores them with a log line, and the
# evaluation record would still list them as if they had decided the answers.
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def check_generation_settings(settings: Mapping[str, Any], where: str = "generation") -> None:
    """Refuse what ``generate_predictions`` cannot honour: several answers per sample, and sampling settings
    without ``do_sample``, naming the key."""
    if settings.get("num_return_sequences", 1) != 1:
        # one prediction per sample is what the scorers read; several would be paired with the wrong samples
        raise ValueError(
            f"{where}.num_return_sequences={settings['num_return_sequences']}: one answer per question is written "
            "(beam search keeps its best beam)"
        )
    if not settings.get("do_sample", False):
        ignored = [key for key in SAMPLING_ONLY if settings.get(key) is not None]
        if ignored:
            given = ", ".join(f"{where}.{key}={settings[key]}" for key in ignored)
            raise ValueError(
                f"{given} only shape(s) sampling, and decoding is greedy: add {where}.do_sample=true, or remove it"
            )


def until_stop(new_tokens: Tensor, stop_ids: int | Sequence[int], keep_stop: bool = False) -> list[list[int]]:
    """Each row's tokens before its first stop id (``generate``'s ``eos_token_id``: one id or several): a stop id
    that is no special token (which decoding would skip) stays out of the answer too. ``keep_stop``: the stop
    token itself kept (what follows it, padding, is still cut)."""
    ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    stops = torch.isin(new_tokens, torch.tensor(ids, dtype=new_tokens.dtype))
    ends = torch.where(stops.any(-1), stops.int().argmax(-1) + int(keep_stop), new_tokens.shape[-1])
    return [row[:end].tolist() for row, end in zip(new_tokens, ends.tolist(), strict=True)]


def generate_predictions(
    model: nn.Module,
    dataset: Any,
    collator: MultimodalCollator,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    **generation_kwargs: Any,
) -> list[dict[str, Any]]:
    """Greedy predictions for this rank's shard of ``dataset`` (a ``MultimodalDataset`` built with
    ``inference=True``), in dataset order; see the module docstring for the fields.

    ``collator`` must pad on the left (``padding_side="left"``) and its tokenizer decodes the answers
    (``skip_special_tokens=True``, stripped). Generation stops at ``stop_token_ids`` and pads with the tokenizer's
    pad id; ``generation_kwargs`` go to ``MultimodalLM.generate`` (e.g. ``num_beams``) and override them. The
    model runs in eval mode under ``torch.no_grad`` and gets its training mode back afterwards. Under ZeRO-3
    every forward gathers parameters from all ranks, so a rank whose shard needs fewer batches runs filler
    batches (one sample, results discarded) until every rank has made the same number of ``generate`` calls.
    """
    check_inference_inputs(dataset, batch_size, "generate_predictions")
    check_generation_settings(generation_kwargs, "generation_kwargs")
    if collator.padding_side != "left":
        raise ValueError(f"generation needs left padding; the collator pads {collator.padding_side!r}")
    indices = shard_indices(len(dataset), rank, world_size)
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    steps = len(batches)
    in_step = world_size > 1 and zero3_partitioned(model)  # every rank must call generate as often
    if in_step:
        # Rank 0 holds the largest shard, ceil(len / world_size); every rank can compute its batch count alone.
        steps = math.ceil(math.ceil(len(dataset) / world_size) / batch_size)
    tokenizer = collator.tokenizer
    settings = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_token_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        **generation_kwargs,
    }
    records = getattr(dataset, "records", None)
    device = _model_device(model)
    predictions: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for step in tqdm(range(steps), desc="generating", unit="batch", disable=not progress or rank != 0):
                chunk = batches[step] if step < len(batches) else []
                samples = [dataset[index] for index in chunk]
                fits = [_fits(collator, sample) for sample in samples]
                kept = [sample for sample, fit in zip(samples, fits, strict=True) if fit]
                answers: list[str] = []
                raw_outputs: list[str] = []
                if kept or in_step:  # under ZeRO-3 a filler batch (nothing to answer) keeps the ranks in step
                    batch = collator(kept or [_filler(dataset, indices, collator)])
                    new_tokens = model.generate(batch_to_device(batch, device), **settings).cpu()
                    if kept:
                        stops = settings["eos_token_id"]
                        answers = tokenizer.batch_decode(until_stop(new_tokens, stops), skip_special_tokens=True)
                        raw_outputs = tokenizer.batch_decode(
                            until_stop(new_tokens, stops, keep_stop=True), skip_special_tokens=False
                        )
                answer, raw_output = iter(answers), iter(raw_outputs)
                for index, sample, fit in zip(chunk, samples, fits, strict=True):
                    record = records[index] if records is not None else sample
                    predictions.append(
                        {
                            **dict(sample.metadata),
                            "index": index,
                            "id": sample.id,
                            "prediction": next(answer).strip() if fit else "",
                            "raw_output": next(raw_output) if fit else "",
                            "answer": target_text(record),
                            **({} if fit else {"dropped": True}),
                        }
                    )
    finally:
        model.train(was_training)
    return predictions


def gather_predictions(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's predictions on every rank, in dataset order (by ``"index"``), under an initialised
    ``torch.distributed`` process group; else ``predictions`` as they are."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(predictions)
    shards: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, list(predictions))
    merged = sorted((p for shard in shards for p in shard), key=lambda p: p["index"])
    seen = [p["index"] for p in merged]
    if len(set(seen)) != len(seen):
        raise ValueError("the ranks' predictions repeat dataset indices: were they sharded with the same world size?")
    return merged


def write_predictions(path: str | Path, predictions: Sequence[dict[str, Any]]) -> Path:
    """Write ``predictions`` as JSON lines (UTF-8, one per question) to ``path``, atomically; returns the path.
    Values JSON cannot hold (a Path, say) are written as their ``str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(p, ensure_ascii=False, default=str) + "\n" for p in predictions)
    write_text_atomic(path, text)
    return path
