"""BEATs (microsoft/unilm ``beats/``, arXiv 2212.09058), frozen, loading the released checkpoints.

There is no maintained BEATs package, so this is a re-implementation of the official ``BEATs.py``,
``backbone.py`` and ``modules.py`` at inference: same parameter names (released checkpoints load with
strict key matching), same math, same floating-point tricks, without fairseq's unused machinery
(incremental state, quantisation noise, layerdrop, gradient scaling).

The forward pass, as the official code does it:

1. waveform [B, T] at 16 kHz -> Kaldi fbank [B, frames, 128] (``fbank.beats_fbank``);
2. a 16x16 stride-16 Conv2d on [B, 1, frames, 128] -> one token per patch, flattened time-major
   (token ``t * 8 + f`` is time patch ``t``, frequency patch ``f``), LayerNorm, ``post_extract_proj``;
3. a weight-normed grouped convolution over the token sequence adds positional information, then the
   encoder's ``layer_norm`` (post-LN: before the layers);
4. post-LN transformer layers with deep_norm residual scaling, and a relative position bias (T5-style
   buckets, computed once from layer 0's table) gated per head and query;
5. fine-tuned checkpoints: ``predictor`` logits averaged over the valid tokens, then a sigmoid.

Padding: the official code turns a waveform padding mask into an fbank-frame mask, then a token mask,
each time by cutting the finer mask into as many equal runs as there are coarser positions (runs of
~161 samples per frame, ~2 frames per token) and marking a position padded when its whole run is.
Tokens are time-major patches, so this token mask is an approximation: it can leave a few frequency
tokens of the first partly padded time patch valid, and the valid tokens then attend to them. It is
reproduced as is in ``extract_features`` (official semantics); a padded sample equals the same sample alone
exactly when its valid frames end on a 16-frame patch boundary (see tests/test_beats.py). The multimodal
model's entry point, ``encode_segments``, does not pad: it encodes clips of one length together.

Dropouts are not applied (this module is only used frozen), so ``train()`` does not change outputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moka_train.models.encoders.fbank import beats_fbank

__all__ = ["BEATs", "BEATsConfig", "build_beats", "load_beats", "tiny_beats_config"]

# The official attention divides the scaled queries by this and multiplies the max-subtracted scores
# back, so that q.k stays small in half precision (see ``SelfAttention.forward``).
_ATTENTION_ALPHA = 32.0

# Fields of the official ``BEATsConfig`` that only matter for training. They are kept so that released
# cfg dicts load unchanged, and ignored here: this module runs frozen, in inference.
TRAINING_ONLY_FIELDS = frozenset(
    {
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "encoder_layerdrop",
        "dropout_input",
        "predictor_dropout",
        "layer_wise_gradient_decay_ratio",
    }
)


@dataclasses.dataclass
class BEATsConfig:
    """The official ``BEATsConfig`` fields and defaults (the released checkpoints' ``cfg`` dicts)."""

    input_patch_size: int = -1  # side of the square fbank patches (16 in every release)
    embed_dim: int = 512  # patch embedding width
    conv_bias: bool = False  # bias in the patch embedding convolution

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"  # of the feed-forward blocks

    layer_wise_gradient_decay_ratio: float = 1.0  # training only
    layer_norm_first: bool = False  # pre-LN layers; the releases are post-LN
    deep_norm: bool = False  # scale the residual by (2 * encoder_layers) ** 0.25 (post-LN only)

    dropout: float = 0.1  # training only
    attention_dropout: float = 0.1  # training only
    activation_dropout: float = 0.0  # training only
    encoder_layerdrop: float = 0.0  # training only
    dropout_input: float = 0.0  # training only

    conv_pos: int = 128  # kernel size of the positional convolution
    conv_pos_groups: int = 16  # its groups

    relative_position_embedding: bool = False
    num_buckets: int = 320  # relative position buckets (both directions together)
    max_distance: int = 1280  # distance from which buckets stop growing
    gru_rel_pos: bool = False  # gate the relative position bias per head and query

    finetuned_model: bool = False  # has the AudioSet ``predictor``
    predictor_dropout: float = 0.1  # training only
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "cfg") -> BEATsConfig:
        """The config of a released ``cfg`` dict; keys the official config does not have are an error
        (they would mean a different architecture that this implementation might silently misread)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"{source}: unknown BEATs config keys {unknown} (known: {sorted(names)})")
        return cls(**cfg)

    def validate(self) -> None:
        """Raise on settings this implementation does not reproduce or that cannot build a model."""
        if self.input_patch_size <= 0:
            raise ValueError(f"input_patch_size must be positive, got {self.input_patch_size}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm goes with post-LN layers (layer_norm_first=False), as in the official code")
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(
                f"activation_fn {self.activation_fn!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
            )
        if self.relative_position_embedding and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            raise ValueError(
                f"num_buckets={self.num_buckets}, max_distance={self.max_distance}: need num_buckets >= 4 and "
                "max_distance > num_buckets // 4 for the logarithmic buckets"
            )


def tiny_beats_config(**overrides: Any) -> BEATsConfig:
    """A tiny config with the structural switches of ``BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2``
    (post-LN deep_norm, gated relative position bias, 527-class predictor), for tests and demos. It is
    the config of the shared reference fixture ``beats_tiny_a.pt``."""
    cfg = dict(
        input_patch_size=16,
        embed_dim=32,
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        layer_wise_gradient_decay_ratio=0.6,
        deep_norm=True,
        dropout=0.0,
        attention_dropout=0.0,
        conv_pos=16,
        conv_pos_groups=4,
        relative_position_embedding=True,
        num_buckets=320,
        max_distance=800,
        gru_rel_pos=True,
        finetuned_model=True,
        predictor_dropout=0.0,
    )
    cfg.update(overrides)
    return BEATsConfig.from_dict(cfg, "tiny_beats_config")


def _gelu(x: Tensor) -> Tensor:
    # The official feed-forward GELU runs in float32 whatever the input dtype.
    return F.gelu(x.float()).type_as(x)


def _gelu_accurate(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


# The official ``get_activation_fn`` choices that keep ``fc1`` a plain Linear ("glu" changes the weights).
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _gelu,
    "gelu_accurate": _gelu_accurate,
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def downsample_padding_mask(padding_mask: Tensor, length: int) -> Tensor:
    """The official ``forward_padding_mask``: a [B, L] padding mask -> [B, length] (True = padding).

    The trailing ``L % length`` positions are dropped, the rest is cut into ``length`` equal runs, and a
    position is padding when its whole run is.
    """
    if padding_mask.shape[1] < length:
        raise ValueError(f"a padding mask of {padding_mask.shape[1]} positions cannot cover {length} positions")
    extra = padding_mask.shape[1] % length
    if extra:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.reshape(padding_mask.shape[0], length, -1).all(-1)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """T5-style bidirectional buckets of ``key - query`` for a sequence of ``length``: [length, length].

    Half the buckets per direction; within a direction, distances below a quarter of ``num_buckets`` get
    a bucket each, larger ones share logarithmically spaced buckets up to ``max_distance``.
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    # The official code takes log(0) for the exact distances and discards it; clamping keeps it finite.
    large = (
        max_exact
        + (
            torch.log(distance.clamp(min=1).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    large = large.clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class WeightNormConv1d(nn.Module):
    """A Conv1d whose weight is ``weight_g * weight_v / ||weight_v||``, the norm over all dims but ``dim``.

    What ``torch.nn.utils.weight_norm(conv, name="weight", dim=dim)`` computes, with the same parameter
    names (``weight_g``, ``weight_v``, ``bias``) as the official checkpoints, without that deprecated
    API's hooks or the parametrization API's different key names.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int, dim: int = 2) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"conv_pos_groups {groups} does not divide encoder_embed_dim {channels}")
        self.padding = kernel_size // 2
        self.groups = groups
        self.dim = dim
        weight = torch.empty(channels, channels // groups, kernel_size)
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4 / (kernel_size * channels)))  # the official init
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(self._norm(weight))
        self.bias = nn.Parameter(torch.zeros(channels))

    def _norm(self, v: Tensor) -> Tensor:
        dims = [d for d in range(v.dim()) if d != self.dim]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        # The same expression and order as torch._weight_norm: v * (g / ||v||).
        weight = self.weight_v * (self.weight_g / self._norm(self.weight_v))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the extra last step that symmetric padding of an even kernel adds, so lengths are kept."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class SelfAttention(nn.Module):
    """The official multi-head self-attention with a (gated) relative position bias, batch first."""

    def __init__(self, cfg: BEATsConfig, owns_relative_bias: bool) -> None:
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim**-0.5
        # Only layer 0 owns the bucket table; the encoder aliases it into the other layers (their keys
        # exist in released checkpoints) and computes the bias once.
        if owns_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, position_bias: Tensor | None) -> Tensor:
        """``x`` [B, N, D]; ``key_padding_mask`` [B, N] (True = padding); ``position_bias`` [H, N, N]."""
        batch, length, dim = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        # Scale, then divide by alpha: the scores are alpha times smaller, max-subtracted, and multiplied
        # back (softmax is unchanged, but nothing large is ever formed in fp16).
        q = q * self.scaling
        q = q * (1 / _ATTENTION_ALPHA)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)

        scores = q @ k.transpose(-1, -2)
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * _ATTENTION_ALPHA
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))

        if position_bias is not None:
            bias = position_bias[None]
            if self.gru_rel_pos:
                # The gate reads the unscaled queries: the official code undoes both factors.
                query = q * _ATTENTION_ALPHA / self.scaling
                gates = self.grep_linear(query).reshape(batch, self.num_heads, length, 2, 4).sum(-1)
                gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            scores = scores + bias

        weights = F.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """The official ``TransformerSentenceEncoderLayer``: post-LN with deep_norm, or pre-LN."""

    def __init__(self, cfg: BEATsConfig, owns_relative_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = SelfAttention(cfg, owns_relative_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        self.layer_norm_first = cfg.layer_norm_first
        # DeepNet: up-weighting the residual keeps deep post-LN stacks stable.
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 1 / 4) if cfg.deep_norm else 1.0

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x: Tensor, padding_mask: Tensor | None, position_bias: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
            return x + self._feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, padding_mask, position_bias))
        return self.final_layer_norm(x * self.residual_scale + self._feed_forward(x))


class TransformerEncoder(nn.Module):
    """Positional convolution, the encoder LayerNorm and the layers (official ``TransformerEncoder``)."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos), nn.GELU()
        )
        self.relative_position_embedding = cfg.relative_position_embedding
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, owns_relative_bias=cfg.relative_position_embedding and i == 0)
            for i in range(cfg.encoder_layers)
        )
        if cfg.relative_position_embedding:
            table = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = table
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_norm = nn.LayerNorm(dim)

    def position_bias(self, length: int) -> Tensor | None:
        """The relative position bias [H, N, N] from layer 0's table, shared by all layers (ungated)."""
        if not self.relative_position_embedding:
            return None
        table = self.layers[0].self_attn.relative_attention_bias
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance, table.weight.device)
        return table(buckets).permute(2, 0, 1)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        position_bias = self.position_bias(x.shape[1])
        for layer in self.layers:
            x = layer(x, padding_mask, position_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    """The BEATs audio encoder (and the AudioSet classifier of fine-tuned checkpoints), frozen.

    Padding masks are True at padding, as in the official code: ``padding_mask`` [B, T] goes with the
    waveforms, and the returned mask [B, N] marks the padded output tokens.
    """

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.hidden_size = cfg.encoder_embed_dim
        self.patch_size = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(
            1, cfg.embed_dim, kernel_size=cfg.input_patch_size, stride=cfg.input_patch_size, bias=cfg.conv_bias
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = TransformerEncoder(cfg)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None
        self.requires_grad_(False)
        super().train(False)

    def _check_mask(self, padding_mask: Tensor | None, shape: tuple[int, ...], what: str) -> None:
        if padding_mask is None:
            return
        if padding_mask.dtype != torch.bool:
            raise TypeError(f"padding_mask must be a bool tensor (True = padding), got {padding_mask.dtype}")
        if tuple(padding_mask.shape) != shape:
            raise ValueError(f"padding_mask {tuple(padding_mask.shape)} does not match the {what} {shape}")

    def _encode(self, fbank: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Last-layer features [B, N, D] and the token padding mask of an fbank [B, frames, mel]."""
        if fbank.dim() != 3:
            raise ValueError(f"fbank must be [B, frames, mel bins], got shape {tuple(fbank.shape)}")
        self._check_mask(padding_mask, tuple(fbank.shape[:2]), "fbank frames")
        if fbank.shape[1] < self.patch_size or fbank.shape[2] < self.patch_size:
            raise ValueError(
                f"an fbank of {fbank.shape[1]} frames x {fbank.shape[2]} bins is smaller than one "
                f"{self.patch_size}x{self.patch_size} patch (BEATs needs at least {self.patch_size} frames, "
                f"{400 + 160 * (self.patch_size - 1)} samples at 16 kHz)"
            )
        weight = self.patch_embedding.weight
        x = self.patch_embedding(fbank.to(device=weight.device, dtype=weight.dtype).unsqueeze(1))
        x = x.flatten(2).transpose(1, 2)  # [B, D, time, freq] -> [B, time * freq, D], time-major
        x = self.layer_norm(x)
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask.to(x.device), x.shape[1])
            if bool(padding_mask.all(-1).any()):
                # Every key masked makes the official attention's softmax NaN: say why instead.
                raise ValueError(
                    "a sample of the batch has no valid token after downsampling its padding mask "
                    f"(valid tokens per sample: {(~padding_mask).sum(-1).tolist()})"
                )
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x, padding_mask), padding_mask

    def _fbank(self, waveforms: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be [B, T] at 16 kHz, got shape {tuple(waveforms.shape)}")
        self._check_mask(padding_mask, tuple(waveforms.shape), "waveforms")
        fbank = beats_fbank(waveforms)
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask.to(fbank.device), fbank.shape[1])
        return fbank, padding_mask

    def features_from_fbank(self, fbank: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Last-layer features [B, N, D] of a normalised fbank [B, frames, 128] (``beats_fbank``'s
        output), and the token padding mask [B, N] from a frame padding mask [B, frames] (None if none)."""
        return self._encode(fbank, padding_mask)

    def extract_features(self, waveforms: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Last-layer features [B, N, D] of 16 kHz waveforms [B, T] (the official ``feature_only=True``),
        N = 8 tokens per 16 fbank frames, and the token padding mask [B, N] (None if none was given)."""
        return self._encode(*self._fbank(waveforms, padding_mask))

    @torch.no_grad()
    def encode_segments(self, media: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The multimodal model's entry point: features [S, N, D] of audio segments [S, T] at 16 kHz, whose
        real lengths in samples are ``lengths`` [S] (None: all T), and a mask [S, N] True at real tokens
        (None when nothing is padded).

        Segments of different lengths are encoded in groups of one length, each group cut to its length, not
        under the official padding mask: that mask leaves some tokens of a clip's padding valid (see the module
        docstring), so a clip's features, and the answers built on them, would depend on the longer clips
        batched with it. Grouped, every segment gets the features it has alone, as the feature cache stores
        them; its token count follows from its length, and the rows are zero-padded to the longest."""
        if lengths is None:
            return self.extract_features(media)[0], None
        if media.dim() != 2 or lengths.shape != media.shape[:1]:
            raise ValueError(
                f"lengths {tuple(lengths.shape)} must be [S] for waveforms [S, T], got {tuple(media.shape)}"
            )
        if bool((lengths > media.shape[1]).any()) or bool((lengths < 0).any()):
            raise ValueError(f"lengths {lengths.tolist()} must lie within the waveforms' {media.shape[1]} samples")
        lengths = lengths.to(media.device)
        groups = [(int(length), (lengths == length).nonzero().flatten()) for length in lengths.unique()]
        if len(groups) == 1:
            length = groups[0][0]
            return self.extract_features(media[:, :length])[0], None
        encoded = [(rows, self.extract_features(media[rows, :length])[0]) for length, rows in groups]
        tokens = max(features.shape[1] for _, features in encoded)
        width = encoded[0][1].shape[2]
        out = encoded[0][1].new_zeros(media.shape[0], tokens, width)
        mask = torch.zeros(media.shape[0], tokens, dtype=torch.bool, device=out.device)
        for rows, features in encoded:
            rows = rows.to(out.device)
            out[rows, : features.shape[1]] = features
            mask[rows, : features.shape[1]] = True
        return out, mask

    def train(self, mode: bool = True) -> BEATs:
        """Stay in eval mode (no dropout): the encoder is frozen, whatever the model around it does."""
        return super().train(False)

    def _predictor(self) -> nn.Linear:
        if self.predictor is None:
            raise RuntimeError(
                "this BEATs checkpoint has no predictor (cfg.finetuned_model is False): only fine-tuned "
                "checkpoints, e.g. BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt, can classify"
            )
        return self.predictor

    def probabilities_from_features(self, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """AudioSet probabilities [B, classes]: the predictor's logits averaged over valid tokens, sigmoid."""
        logits = self._predictor()(features)
        if padding_mask is not None and bool(padding_mask.any()):
            logits = logits.masked_fill(padding_mask[..., None], 0.0).sum(dim=1)
            logits = logits / (~padding_mask).sum(dim=1, keepdim=True)
        else:
            logits = logits.mean(dim=1)
        return torch.sigmoid(logits)

    def classify(self, waveforms: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """AudioSet probabilities [B, predictor_class] of waveforms [B, T] (the official
        ``extract_features`` of a fine-tuned checkpoint)."""
        self._predictor()  # before the encoder runs
        return self.probabilities_from_features(*self.extract_features(waveforms, padding_mask))


def build_beats(cfg: BEATsConfig | Mapping[str, Any], seed: int | None = None) -> BEATs:
    """A randomly initialised, frozen BEATs (tests, demos); ``seed`` makes the weights reproducible.

    PyTorch's default initialisation (the positional convolution's is the official one): these weights
    are for exercising the code, not the official pre-training initialisation.
    """
    if not isinstance(cfg, BEATsConfig):
        cfg = BEATsConfig.from_dict(dict(cfg))
    if seed is not None:
        torch.manual_seed(seed)
    return BEATs(cfg)


def load_beats(path: str | os.PathLike) -> BEATs:
    """A released BEATs checkpoint (``{"cfg": dict, "model": state_dict}``), frozen, in eval mode.

    Keys must match exactly: a missing or unexpected key, or an unknown cfg key, raises naming the file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"BEATs checkpoint {path} does not exist (nothing is downloaded)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"cfg", "model"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a BEATs checkpoint (expected keys 'cfg' and 'model', found {found})")
    model = BEATs(BEATsConfig.from_dict(dict(checkpoint["cfg"]), str(path)))
    state = checkpoint["model"]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: BEATs keys do not match the cfg: missing {missing}, unexpected {unexpected}")
    # Later layers alias layer 0's relative position table; the copies saved under their names must agree.
    tables = [key for key in state if key.endswith("self_attn.relative_attention_bias.weight")]
    for key in tables[1:]:
        if not torch.equal(state[key], state[tables[0]]):
            raise ValueError(f"{path}: {key} differs from {tables[0]}; BEATs shares one relative position table")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{path}: {error}") from error
    model.requires_grad_(False)
    return model.eval()
