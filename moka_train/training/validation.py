"""The validation loss during training: the mean loss per answer token over a held-out split (``validation.split``),
each rank scoring its share, summed over ranks. It changes nothing in the run it watches: no gradient, the modules'
modes restored, no draw from the RNG the training step uses (so a run with validation trains the same weights)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

from moka_train.data.collate import batch_to_device
from moka_train.models.mllm import encode_media
from moka_train.training.distributed import all_reduce_sum
from moka_train.training.engine import Engine
from moka_train.training.stop_signals import iterate_loader

T = TypeVar("T")


def spread_evenly(items: Sequence[T], count: int | None) -> list[T]:
    """At most ``count`` of ``items``, spread evenly over them in their order (all of them for ``None``): a split
    stored sorted by video or question type keeps every part, where its first ``count`` would not."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def validation_batches(size: int, micro_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of a validation set of ``size`` samples: every ``world_size``-th sample from
    ``rank`` on, ``micro_batch_size`` at a time, then empty micro-batches (which the collator makes fillers, one
    pad token with no label) up to the count of the rank with the most. Every rank so runs as many forwards:
    ZeRO-3 gathers the parameters in each, and a rank that stopped early would leave the others waiting."""
    mine = list(range(rank, size, world_size))
    per_rank = math.ceil(math.ceil(size / world_size) / micro_batch_size)
    batches = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return batches + [[] for _ in range(per_rank - len(batches))]


def validation_loss(
    engine: Engine, batches: Iterable[dict[str, Any]], encoders: dict[str, torch.nn.Module]
) -> tuple[float, int]:
    """The mean loss per label token over every rank's ``batches`` (collated training batches, answers included),
    and the number of label tokens. The model runs in eval mode (no dropout) without gradients, then every module
    gets its mode back. NaN when the set has no label token."""
    modes = [(module, module.training) for module in engine.module.modules()]
    engine.module.eval()
    summed, labels = torch.zeros((), dtype=torch.float64), 0
    iterator = iterate_loader(batches)
    try:
        with torch.no_grad():
            for batch in iterator:
                output = engine.evaluate(encode_media(encoders, batch_to_device(batch, engine.device)))
                summed += output.loss.double().cpu()  # summed over the batch's label tokens; a filler's is 0
                labels += output.label_count
    finally:
        del iterator  # a DataLoader's workers leave now, on an error too (see iterate_loader)
        for module, training in modes:
            module.training = training
    totals = all_reduce_sum(torch.stack([summed, torch.tensor(float(labels), dtype=torch.float64)]))
    count = int(totals[1].item())
    return (totals[0].item() / count if count else math.nan), count
