"""Samples -> the batch ``MultimodalLM`` consumes (DESIGN.md, "The data contract").

Per sample the collator renders the backbone's chat template once, tokenizes the rendered text once and
finds the question and the response through the tokenizer's character offsets. Tokenizing pieces
separately and concatenating them (LLaVA-style) gives ids the model never sees at inference, since BPE
merges across piece boundaries, and a label mask computed from the pieces' lengths then drifts off the
answer; offsets of the one real tokenization cannot drift. Each placeholder is then expanded in token space
to its item's segment count x the projector's tokens per segment, with its modality id, so the model can
scatter projector tokens onto exactly those positions.

A sample longer than ``max_length`` is never truncated (a cut media block would misalign every later
projector token): it stops the run with an error naming it, or is left out of its batch with a counted
warning, as configured.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from moka_train.adapters.config import QUESTION_KEYS
from moka_train.data.sample import Sample
from moka_train.modality import Modality
from moka_train.models.mllm import IGNORE_INDEX
from moka_train.models.tokenizer import PLACEHOLDERS

ON_OVERFLOW = ("error", "drop")
MEDIA_KINDS = ("raw", "features")
PADDING_SIDES = ("left", "right")
# The tensor rank of one raw media item per modality: frames [S, 3, H, W], windows / clips [S, T].
RAW_DIMS = {"visual": 4, "audio": 2, "speech": 2}


@dataclass
class EncodedSample:
    """One sample's token rows, placeholders already expanded (1-D, all of the same length)."""

    input_ids: Tensor
    labels: Tensor | None  # None for an inference sample
    modality_ids: Tensor
    question_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class MultimodalCollator:
    """Collate ``Sample``s into ``input_ids``, ``attention_mask``, ``labels`` (training batches only),
    ``modality_ids``, ``question_mask``, the media (``media`` / ``media_lengths`` for ``media_kind="raw"``,
    ``features`` / ``feature_masks`` for ``"features"``), ``ids``, ``metadata`` and ``dropped`` (the ids
    left out of this batch for being too long).

    ``tokens_per_segment``: modality -> the projector's tokens per segment (its ``num_queries``).
    ``max_length``: the longest expanded sample allowed; ``on_overflow``: ``"error"`` stops with the
    sample's id, ``"drop"`` leaves it out with a warning and counts it in ``dropped`` (per process: with
    DataLoader workers each worker has its own copy, so read the batches' ``dropped`` ids for a total, as the
    training loop does: ``dropped_samples`` in its metrics, summed over ranks).
    ``fill_empty`` (the training loop's collator): a training batch with no sample (none given, or all left out)
    is one pad token with no label and no media, and no ``ids``, which the loop runs as a filler; otherwise it is
    an error.
    ``padding_side``: defaults to the tokenizer's; generation needs ``"left"``.
    ``question_keys``: which prompt tokens ``question_mask`` marks (``QUESTION_KEYS``): ``span`` (the sample's
    ``question_span``) or ``after_media`` (every prompt token after the last media placeholder; none for a sample
    without media).

    A batch is all training samples (ending with the answer) or all inference samples (ending with the
    user's turn, rendered with the generation prompt).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        tokens_per_segment: Mapping[str, int],
        max_length: int | None = None,
        on_overflow: str = "error",
        padding_side: str | None = None,
        media_kind: str = "raw",
        fill_empty: bool = False,
        question_keys: str = "span",
    ) -> None:
        if question_keys not in QUESTION_KEYS:
            raise ValueError(f"question_keys must be one of {QUESTION_KEYS}, got {question_keys!r}")
        self.question_keys = question_keys
        if on_overflow not in ON_OVERFLOW:
            raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
        if media_kind not in MEDIA_KINDS:
            raise ValueError(f"media_kind must be one of {MEDIA_KINDS}, got {media_kind!r}")
        padding_side = tokenizer.padding_side if padding_side is None else padding_side
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if max_length is not None and (isinstance(max_length, bool) or int(max_length) != max_length or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (load_tokenizer pads with EOS)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; give it one with set_chat_template")
        self.tokens_per_segment: dict[str, int] = {}
        for name, count in tokens_per_segment.items():
            modality = Modality.parse(name)
            if modality is Modality.TEXT:
                raise ValueError("tokens_per_segment: text has no projector tokens")
            if isinstance(count, bool) or int(count) != count or count < 1:
                raise ValueError(f"tokens_per_segment[{name!r}] must be a positive int, got {count!r}")
            self.tokens_per_segment[modality.key] = int(count)
        # Placeholder id -> modality key, checked once: a placeholder the tokenizer does not keep whole would
        # never be found in the token ids.
        self.placeholder_modality: dict[int, str] = {}
        for placeholder, modality in PLACEHOLDERS.items():
            token_id = tokenizer.convert_tokens_to_ids(placeholder)
            if (
                token_id is None
                or token_id == tokenizer.unk_token_id
                or tokenizer.tokenize(placeholder) != [placeholder]
            ):
                raise ValueError(
                    f"the tokenizer does not keep {placeholder} as one special token: call add_multimodal_tokens"
                )
            self.placeholder_modality[int(token_id)] = modality.key
        self.tokenizer = tokenizer
        self.max_length = None if max_length is None else int(max_length)
        self.on_overflow = on_overflow
        self.padding_side = padding_side
        self.media_kind = media_kind
        self.fill_empty = fill_empty
        self.dropped = 0
        self._warned_no_eos = False

    # -- one sample ----------------------------------------------------------------------------------
    def render(self, sample: Sample) -> tuple[str, int, int]:
        """The rendered conversation, where its prompt ends and where the supervised response ends.

        Training: the full conversation, whose start must be the prompt rendered alone with the
        generation prompt (else the template is not prefix-stable and no split into prompt and response
        is right); the response ends after the last EOS in it, so that what a template writes after the
        answer's EOS (ChatML's newline) is not supervised: generation stops at EOS and never produces it.
        Inference: the conversation with the generation prompt; both ends are the text's end.
        """
        template = self.tokenizer.apply_chat_template
        if not sample.is_training:
            text = template(sample.messages, tokenize=False, add_generation_prompt=True)
            return text, len(text), len(text)
        text = template(sample.messages, tokenize=False, add_generation_prompt=False)
        prompt = template(sample.messages[:-1], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ValueError(
                f"sample {sample.id!r}: the chat template is not prefix-stable: the conversation rendered with its "
                f"answer does not start with the prompt rendered alone ({prompt[-60:]!r} vs "
                f"{text[max(0, len(prompt) - 60) : len(prompt)]!r} at the prompt's end)"
            )
        response_end = len(text)
        eos = self.tokenizer.eos_token
        if eos and eos in text[len(prompt) :]:
            response_end = text.rindex(eos, len(prompt)) + len(eos)
        elif not self._warned_no_eos and not text.endswith(tuple(self.tokenizer.all_special_tokens)):
            # A base checkpoint's tokenizer (Qwen2's EOS <|endoftext|>) under an instruct template (turns end with
            # "<|im_end|>\n"): what the template writes after the turn's end is supervised, so the model learns to
            # write past it. (A text that ends in a special token, LLaMA-3's <|eot_id|>, has nothing after it.)
            self._warned_no_eos = True
            warnings.warn(
                f"the chat template's answer turn holds no eos_token {eos!r} and ends in plain text (sample "
                f"{sample.id!r}: {text[len(prompt) :][-40:]!r}): all of it is supervised, and generation stops only "
                "at that token or the checkpoint's generation_config eos ids; set the tokenizer's eos_token to the "
                "template's end-of-turn token",
                stacklevel=2,
            )
        return text, len(prompt), response_end

    def question_chars(self, sample: Sample, text: str, prompt_end: int) -> tuple[int, int] | None:
        """The question's character span in the rendered text: the last user turn's content is searched
        for (last occurrence ending before the prompt's end), then ``question_span`` is shifted onto it.
        Templates that strip the content (Llama-3's ``| trim``) are followed; any other change is an error."""
        if sample.question_span is None:
            return None
        content = sample.messages[sample.last_user_index]["content"]
        start = text.rfind(content, 0, prompt_end)
        shift = 0
        if start < 0:
            stripped = content.strip()
            start = text.rfind(stripped, 0, prompt_end) if stripped else -1
            shift = len(content) - len(content.lstrip())
            content = stripped
        if start < 0:
            raise ValueError(
                f"sample {sample.id!r}: the last user turn's content is not in the rendered prompt verbatim (the "
                "chat template changed it), so its question span cannot be located"
            )
        span_start, span_end = (position - shift for position in sample.question_span)
        span_start, span_end = max(span_start, 0), min(span_end, len(content))
        if span_start >= span_end:
            raise ValueError(f"sample {sample.id!r}: question_span {sample.question_span} lies on stripped spaces")
        return start + span_start, start + span_end

    def encode(self, sample: Sample) -> EncodedSample:
        """The sample's token rows with every placeholder expanded (not padded, not length-checked)."""
        if not isinstance(sample, Sample):
            raise TypeError(f"the collator takes Sample objects, got {type(sample).__name__}")
        sample.validate()
        self._check_media_kind(sample)
        missing = sorted(set(sample.media) - set(self.tokens_per_segment))
        if missing:
            raise ValueError(
                f"sample {sample.id!r} has {missing} media, but tokens_per_segment only covers "
                f"{sorted(self.tokens_per_segment)}"
            )
        text, prompt_end, response_end = self.render(sample)
        question = self.question_chars(sample, text, prompt_end) if self.question_keys == "span" else None
        encoded = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
        offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]

        modality_ids = torch.full_like(input_ids, int(Modality.TEXT))
        repeats = torch.ones_like(input_ids)
        for token_id, name in self.placeholder_modality.items():
            modality_ids[input_ids == token_id] = int(Modality.parse(name))
        placeholder = modality_ids != int(Modality.TEXT)
        for name in sorted(set(self.placeholder_modality.values())):
            positions = (modality_ids == int(Modality.parse(name))).nonzero().flatten()
            items = sample.media.get(name, [])
            if len(positions) != len(items):
                raise ValueError(
                    f"sample {sample.id!r}: the rendered text holds {len(positions)} {name} placeholder token(s) "
                    f"for {len(items)} {name} media item(s) (the chat template adds or drops placeholders)"
                )
            if items:
                segments = torch.tensor([item.shape[0] for item in items], dtype=torch.long)
                repeats[positions] = segments * self.tokens_per_segment[name]

        question_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        if self.question_keys == "after_media" and bool(placeholder.any()):
            # Every unsupervised prompt token after the last placeholder (none in a sample without media).
            after = torch.arange(len(input_ids)) > int(placeholder.nonzero().max())
            question_mask = after & (ends <= prompt_end)
        if question is not None:
            # Any character of the token inside the span; placeholders are media, never question text.
            question_mask = (starts < question[1]) & (ends > question[0]) & (ends > starts) & ~placeholder
            if not bool(question_mask.any()):
                raise ValueError(
                    f"sample {sample.id!r}: question_span {sample.question_span} covers no text token (only "
                    "placeholders?)"
                )
        labels = None
        if sample.is_training:
            # Any character of the token in the response: a token straddling the boundary is supervised.
            supervised = (ends > prompt_end) & (starts < response_end) & ~placeholder
            if not bool(supervised.any()):
                raise ValueError(f"sample {sample.id!r}: the response holds no token to supervise")
            labels = torch.where(supervised, input_ids, IGNORE_INDEX)

        def expand(row: Tensor) -> Tensor:
            return row.repeat_interleave(repeats)

        return EncodedSample(
            input_ids=expand(input_ids),
            labels=None if labels is None else expand(labels),  # placeholder labels are -100, as copies
            modality_ids=expand(modality_ids),
            question_mask=expand(question_mask),
        )

    def _check_media_kind(self, sample: Sample) -> None:
        for name, items in sample.media.items():
            for index, item in enumerate(items):
                if self.media_kind == "features" and item.dim() != 3:
                    raise ValueError(
                        f"sample {sample.id!r}: {name} item {index} has shape {tuple(item.shape)}, but the collator "
                        "collates cached features [S, N, D] (media_kind='features')"
                    )
                if self.media_kind == "raw" and item.dim() != RAW_DIMS[name]:
                    expected = "pixels [S, 3, H, W]" if RAW_DIMS[name] == 4 else "waveforms [S, T]"
                    hint = " (features? use media_kind='features')" if item.dim() == 3 else ""
                    raise ValueError(
                        f"sample {sample.id!r}: raw {name} item {index} has shape {tuple(item.shape)}; expected "
                        f"{expected}{hint}"
                    )
        if self.media_kind == "raw" and sample.feature_masks:
            raise ValueError(f"sample {sample.id!r} has feature_masks, but the collator collates raw media")

    # -- the batch -----------------------------------------------------------------------------------
    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if not samples and not self.fill_empty:
            raise ValueError("cannot collate an empty list of samples")
        training = {sample.is_training for sample in samples if isinstance(sample, Sample)}
        if len(training) > 1:
            raise ValueError(
                "a batch mixes training samples (ending with the answer) and inference samples (ending with the "
                f"user's turn): {[s.id for s in samples]}"
            )
        kept: list[Sample] = []
        rows: list[EncodedSample] = []
        dropped: list[str] = []
        for sample in samples:
            row = self.encode(sample)
            if self.max_length is not None and len(row) > self.max_length:
                if self.on_overflow == "error":
                    raise ValueError(
                        f"sample {sample.id!r} is {len(row)} tokens long with its media expanded, over max_length "
                        f"{self.max_length} (on_overflow='drop' leaves such samples out; samples are never cut)"
                    )
                self.dropped += 1
                dropped.append(sample.id)
                warnings.warn(
                    f"dropped sample {sample.id!r}: {len(row)} tokens with its media expanded > max_length "
                    f"{self.max_length} ({self.dropped} dropped so far)",
                    stacklevel=2,
                )
                continue
            kept.append(sample)
            rows.append(row)
        if not rows:
            if not self.fill_empty or training == {False}:  # inference batches always error
                raise ValueError(
                    f"every sample of the batch was dropped for exceeding max_length {self.max_length}: {dropped}"
                )
            # A training micro-batch with no sample (an empty slot of an epoch's last step, or every sample over
            # max_length) must still run: DeepSpeed counts micro-steps, ZeRO-3 gathers on every rank. One pad
            # token, nothing to learn, no media (every projector then runs on its dummy segment).
            kept, rows = [], [self._stand_in_row()]
        batch = self._pad(rows)
        if self.media_kind == "raw":
            batch.update(self._raw_media(kept))
        else:
            batch.update(self._features(kept))
        batch["ids"] = [sample.id for sample in kept]
        batch["metadata"] = [sample.metadata for sample in kept]
        batch["dropped"] = dropped
        return batch

    def _stand_in_row(self) -> EncodedSample:
        pad = torch.tensor([int(self.tokenizer.pad_token_id)])
        return EncodedSample(
            input_ids=pad,
            labels=torch.full_like(pad, IGNORE_INDEX),
            modality_ids=torch.full_like(pad, int(Modality.TEXT)),
            question_mask=torch.zeros_like(pad, dtype=torch.bool),
        )

    def _pad(self, rows: list[EncodedSample]) -> dict[str, Tensor]:
        length = max(len(row) for row in rows)
        shape = (len(rows), length)
        batch = {
            "input_ids": torch.full(shape, int(self.tokenizer.pad_token_id), dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "modality_ids": torch.full(shape, int(Modality.PAD), dtype=torch.long),
            "question_mask": torch.zeros(shape, dtype=torch.bool),
        }
        training = rows[0].labels is not None
        if training:
            batch["labels"] = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for index, row in enumerate(rows):
            columns = slice(length - len(row), length) if self.padding_side == "left" else slice(0, len(row))
            batch["input_ids"][index, columns] = row.input_ids
            batch["attention_mask"][index, columns] = 1
            batch["modality_ids"][index, columns] = row.modality_ids
            batch["question_mask"][index, columns] = row.question_mask
            if training:
                batch["labels"][index, columns] = row.labels
        return batch

    @staticmethod
    def _items(samples: list[Sample], name: str) -> list[tuple[str, Tensor, Tensor | None]]:
        """``(sample id, item, feature mask or None)`` of one modality, batch-major, in order of appearance."""
        return [
            (sample.id, item, sample.feature_masks[name][index] if name in sample.feature_masks else None)
            for sample in samples
            for index, item in enumerate(sample.media.get(name, []))
        ]

    @staticmethod
    def _modalities(samples: list[Sample]) -> list[str]:
        return sorted({name for sample in samples for name in sample.media})

    def _raw_media(self, samples: list[Sample]) -> dict[str, dict[str, Tensor]]:
        """Every item's segments concatenated per modality. Frames must share one size; waveforms of
        different lengths are right-padded with zeros and their real lengths returned."""
        media: dict[str, Tensor] = {}
        lengths: dict[str, Tensor] = {}
        for name in self._modalities(samples):
            items = self._items(samples, name)
            if RAW_DIMS[name] == 4:
                shapes = {tuple(item.shape[1:]) for _, item, _ in items}
                if len(shapes) > 1:
                    described = ", ".join(f"{sid}: {tuple(item.shape)}" for sid, item, _ in items)
                    raise ValueError(
                        f"{name} items of one batch must share their frame shape [3, H, W] (resize when "
                        f"preprocessing); got {described}"
                    )
                media[name] = torch.cat([item for _, item, _ in items])
                continue
            sizes = [item.shape[1] for _, item, _ in items]
            longest = max(sizes)
            media[name] = torch.cat([F.pad(item, (0, longest - item.shape[1])) for _, item, _ in items])
            if len(set(sizes)) > 1:
                lengths[name] = torch.tensor(
                    [size for (_, item, _), size in zip(items, sizes, strict=True) for _ in range(item.shape[0])]
                )
        batch: dict[str, dict[str, Tensor]] = {"media": media}
        if lengths:
            batch["media_lengths"] = lengths
        return batch

    def _features(self, samples: list[Sample]) -> dict[str, dict[str, Tensor]]:
        """Every item's features concatenated per modality, token counts padded with zeros to the longest;
        the masks come along when an item had one or token counts differ."""
        features: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        for name in self._modalities(samples):
            items = self._items(samples, name)
            widths = {item.shape[2] for _, item, _ in items}
            if len(widths) > 1:
                described = ", ".join(f"{sid}: {tuple(item.shape)}" for sid, item, _ in items)
                raise ValueError(f"{name} features of one batch must share their width D; got {described}")
            longest = max(item.shape[1] for _, item, _ in items)
            features[name] = torch.cat([F.pad(item, (0, 0, 0, longest - item.shape[1])) for _, item, _ in items])
            if any(mask is not None or item.shape[1] != longest for _, item, mask in items):
                masks[name] = torch.cat(
                    [
                        F.pad(
                            mask if mask is not None else torch.ones(item.shape[:2], dtype=torch.bool),
                            (0, longest - item.shape[1]),
                            value=False,
                        )
                        for _, item, mask in items
                    ]
                )
        batch: dict[str, dict[str, Tensor]] = {"features": features}
        if masks:
            batch["feature_masks"] = masks
        return batch


def batch_to_device(value: Any, device: torch.device | str) -> Any:
    """A collated batch (or any part of it) with every tensor on ``device``; ids, metadata and counts stay."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: batch_to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [batch_to_device(item, device) for item in value]
    return value
