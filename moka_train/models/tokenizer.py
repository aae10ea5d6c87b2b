"""Tokenizers: a backbone's own from its local directory, a small one built locally for the demo, and the
multimodal special tokens added to either.

The special tokens are ``<image>``, ``<video>``, ``<audio>``, ``<speech>`` (placeholders: the collator
expands each to its projector's token count and the model puts projector tokens there) and their
``_start`` / ``_end`` markers, which stay in the prompt as text tokens with trainable embeddings. They are
added as special tokens, so a placeholder is always one id and never merges with its neighbours. Their ids
are saved with the checkpoint and checked at load (``AddedTokenEmbedding.check_token_ids``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from moka_train.modality import Modality
from moka_train.models.chat_templates import CHATML

# Placeholder token -> the modality whose projector fills it. Images and video frames share the visual
# encoder and projector, as in the official setup (a stage-1 image projector is reused on video frames).
PLACEHOLDERS: dict[str, Modality] = {
    "<image>": Modality.VISUAL,
    "<video>": Modality.VISUAL,
    "<audio>": Modality.AUDIO,
    "<speech>": Modality.SPEECH,
}


def multimodal_special_tokens() -> list[str]:
    """Every added token, in the fixed order their ids are assigned: placeholder, start, end per medium."""
    tokens = []
    for placeholder in PLACEHOLDERS:
        stem = placeholder[1:-1]
        tokens += [placeholder, f"<{stem}_start>", f"<{stem}_end>"]
    return tokens


def added_token_modalities() -> list[str]:
    """The modality key of each added token, in ``multimodal_special_tokens`` order (``<audio_start>`` -> audio)."""
    return [PLACEHOLDERS[f"<{token[1:-1].removesuffix('_start').removesuffix('_end')}>"].key
            for token in multimodal_special_tokens()]  # fmt: skip


@dataclass(frozen=True)
class MultimodalTokens:
    """The ids the tokenizer gave the added tokens."""

    ids: dict[str, int]  # token -> id, for every added token

    @property
    def added_token_ids(self) -> list[int]:
        return [self.ids[token] for token in multimodal_special_tokens()]

    def placeholder_ids(self) -> dict[str, list[int]]:
        """``{modality key: [placeholder ids]}`` for ``MultimodalLM``."""
        by_modality: dict[str, list[int]] = {}
        for token, modality in PLACEHOLDERS.items():
            by_modality.setdefault(modality.key, []).append(self.ids[token])
        return by_modality


def add_multimodal_tokens(tokenizer: PreTrainedTokenizerBase) -> MultimodalTokens:
    """Add the multimodal special tokens (tokens already present keep their ids) and return their ids."""
    tokens = multimodal_special_tokens()
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
    for token, token_id in ids.items():
        # A tokenizer that failed to register the token maps it to unk (or None): catch that here, not as
        # placeholders that never match in the model.
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.tokenize(token) != [token]:
            raise ValueError(f"the tokenizer did not register {token} as a single special token (got id {token_id})")
    return MultimodalTokens(ids)


def load_tokenizer(path: str | os.PathLike, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """A backbone's tokenizer from its local checkpoint directory (never a download).

    Tokenizers without a pad token (Llama-2, Llama-3) pad with EOS, as the official code does; padding
    positions are masked by the attention mask and labels, so the id itself never matters.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist (a local checkpoint directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot load a tokenizer from {directory}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# Text the demo tokenizer learns its merges from: the words of the demo's prompts and answers, so that they
# tokenize into a few pieces each. Any byte still encodes (byte-level BPE), just less compactly.
DEMO_CORPUS = [
    "You are a helpful assistant.",
    "This is a video: This is an audio: This is an image: This is a speech clip:",
    "Please answer this question: Please describe the events and time range that occurred in the video.",
    "What is the instrument on the left? How many instruments are sounding? Is the piano louder than the violin?",
    "Which instrument makes the sound first? Where is the loudest instrument? Is this sound from the guitar?",
    "yes no zero one two three four five six seven eight nine ten left right middle",
    "piano violin guitar cello flute drum accordion trumpet saxophone bagpipe banjo erhu xylophone tuba",
    "Church bell Male speech Dog barking Baby cry Helicopter Train horn Acoustic guitar Frying food",
    "<event>Church bell</event> <range>6,8</range> <answer>yes</answer> The answer is (A) (B) (C) (D)",
    "a photo of a cat sitting on a red chair near the window, people walking in the street at night",
]
DEMO_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_demo_tokenizer(vocab_size: int = 384, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here (milliseconds) on ``DEMO_CORPUS``, with Qwen-style turn
    markers and the ChatML template: what the tiny random backbones of the tests and the demo read.
    ``vocab_size`` counts the specials; the multimodal tokens come on top (``add_multimodal_tokens``)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=DEMO_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(DEMO_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side=padding_side
    )
    tokenizer.chat_template = CHATML
    return tokenizer
