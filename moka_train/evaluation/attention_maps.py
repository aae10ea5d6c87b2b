"""MokA's cross-attention maps: how each media modality's tokens attend over the question's tokens.

In every MokA layer the low-rank activation of each media token queries the sample's question tokens
(``softmax(a_i K^T / sqrt(S))``, ``moka_train.adapters.methods.moka``). The paper plots these weights to show
that, e.g., the audio tokens attend to "sound" in the question. ``CrossAttentionRecorder`` collects them from a
forward pass: per sample and per media modality, the weights averaged over that modality's tokens (the queries)
and over the chosen layers and projections. The fused attention kernel returns no weights, so the recorded
layers compute them explicitly; the others, and every forward outside the recorder, are unchanged.

``plot_attention_map`` draws one sample's map as a heat map: a row per media modality, a column per question
token, labelled with the token's text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moka_train.adapters import adapted_layers, get_adapter_config
from moka_train.adapters.methods.moka import MokaLinear
from moka_train.adapters.routing import TokenRouting

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer number in a module name (``model.layers.3.self_attn.q_proj`` -> 3), else None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def select_layers(
    llm: nn.Module, layers: Sequence[int] | None = None, projections: Sequence[str] | None = None
) -> dict[str, MokaLinear]:
    """The MokA layers of ``llm`` in decoder ``layers`` (None: all) whose last name part is in ``projections``
    (None: every adapted one). A ValueError names what does not exist, or an adapter other than MokA."""
    config = get_adapter_config(llm)
    if config.method != "moka":
        raise ValueError(
            f"attention maps are MokA's cross-attention; this model's adapter is {config.method!r} (its variants "
            "have no media-over-question attention: moka_no_ca has none, naive uses uniform weights, text_query "
            "attends the other way)"
        )
    found = {name: layer for name, layer in adapted_layers(llm) if isinstance(layer, MokaLinear)}
    numbers = sorted({n for n in map(layer_index, found) if n is not None})
    kinds = sorted({name.rsplit(".", 1)[-1] for name in found})
    if layers is not None:
        unknown = sorted(set(layers) - set(numbers))
        if unknown:
            raise ValueError(f"layers {unknown} do not exist; the adapted decoder layers are {numbers}")
    if projections is not None:
        unknown = sorted(set(projections) - set(kinds))
        if unknown:
            raise ValueError(f"projections {unknown} carry no MokA layer; the adapted ones are {kinds}")
    return {
        name: layer
        for name, layer in found.items()
        if (layers is None or layer_index(name) in set(layers))
        and (projections is None or name.rsplit(".", 1)[-1] in set(projections))
    }


@dataclass
class SampleMap:
    """One sample's map: ``weights[modality]`` over the question tokens (each row sums to 1)."""

    question_tokens: list[str]
    weights: dict[str, list[float]]


class CrossAttentionRecorder:
    """Records the media-over-question attention of the given MokA layers while it is open::

        with CrossAttentionRecorder(select_layers(model.llm, layers=[0, 1])) as recorder:
            model(batch)
        maps = recorder.maps(tokenizer, batch["input_ids"])

    Each layer call adds, per sample and per media modality m, the mean over m's tokens of their weight rows
    ([B, N] over the question slots); ``maps`` averages over the calls since the last ``reset``.
    """

    def __init__(self, layers: dict[str, MokaLinear]) -> None:
        if not layers:
            raise ValueError("no MokA layer to record: check layers / projections")
        self.layers = layers
        first = next(iter(layers.values()))
        self.modalities = list(first.config.modalities)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[int, Tensor] = {}  # configured modality index -> [B, N]
        self._calls = 0
        self._tokens: TokenRouting | None = None

    def __enter__(self) -> CrossAttentionRecorder:
        for layer in self.layers.values():
            layer.attention_recorder = self._record
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers.values():
            layer.attention_recorder = None

    def _record(self, layer: MokaLinear, weights: Tensor, tokens: TokenRouting) -> None:
        # Every layer of one forward shares one routing view; a new view means a second forward.
        if self._tokens is not None and tokens is not self._tokens:
            raise RuntimeError("the recorder saw two forwards: call maps() and reset() between them")
        self._tokens = tokens
        weights = weights.float()
        for index in range(1, len(self.modalities)):  # text (0) does not query
            queries = (tokens.modality_index == index).unsqueeze(-1).float()  # [B, L, 1]
            mean = (weights * queries).sum(dim=1) / queries.sum(dim=1).clamp(min=1)  # [B, N]
            self._sums[index] = self._sums.get(index, 0) + mean
        self._calls += 1

    def maps(self, tokenizer, input_ids: Tensor) -> list[SampleMap]:
        """One map per sample of the recorded batch: the question tokens (decoded one by one) and, per media
        modality the sample has, its averaged weights over them. Samples without a question or without a
        modality's tokens leave those rows out."""
        if self._tokens is None or not self._calls:
            raise RuntimeError("nothing recorded: run a forward with media and a question inside the recorder")
        tokens, question = self._tokens, self._tokens.question
        ids = input_ids.to(question.index.device)
        maps = []
        for sample in range(ids.shape[0]):
            count = int(question.count[sample])
            positions = question.index[sample, :count].tolist()
            labels = [tokenizer.decode([int(ids[sample, p])]) for p in positions]
            rows = {}
            for index, total in self._sums.items():
                has_tokens = bool((tokens.modality_index[sample] == index).any())
                if count and has_tokens:
                    rows[self.modalities[index]] = (total[sample, :count] / self._calls).tolist()
            maps.append(SampleMap(labels, rows))
        return maps


def plot_attention_map(sample: SampleMap, title: str, path: Path) -> None:
    """A heat map: one row per media modality, one column per question token (its text as the label)."""
    # The object API on the Agg canvas: no pyplot state, no display; imported here (about a second).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(sample.weights)
    values = torch.tensor([sample.weights[m] for m in names]).numpy() if names else None
    width = max(4.0, 0.38 * len(sample.question_tokens) + 1.8)
    figure = Figure(figsize=(width, 0.55 * max(len(names), 1) + 1.9))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    if values is not None:
        # The colours span the weights' own range (the colour bar gives it): in a model whose attention is
        # nearly uniform the differences would vanish on a 0-1 scale. The title gives the uniform level.
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        title += f"  (uniform: 1/{len(sample.question_tokens)} = {1 / max(len(sample.question_tokens), 1):.3f})"
    labels = [repr(t.replace("\n", "\\n"))[1:-1] or "·" for t in sample.question_tokens]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
