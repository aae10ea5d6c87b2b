"""CLIP's image tower (open_clip), frozen, giving the patch tokens of one transformer block.

MoKA's visual features are the patch tokens of CLIP ViT-L/14's penultimate block (LLaVA's
``vision_feature_layer=-2``, Hugging Face ``hidden_states[23]`` of 24), CLS dropped: 256 tokens x 1024 per
224 px image or video frame. ``layer`` picks the block with Python indexing over
``visual.transformer.resblocks`` (-2 = the penultimate), the same as ``forward_intermediates(indices=[layer])``;
the block's raw output is returned (no ``ln_post``, no ``proj``).

Weights come from a local file only, never from a download:

* an open_clip state dict (``open_clip_pytorch_model.bin``, ``.pth``, ``.safetensors``, or an open_clip
  training checkpoint ``{"state_dict": ...}`` with or without DDP's ``module.`` prefix);
* OpenAI's release (``ViT-L-14.pt``), a TorchScript archive, or an OpenAI-format plain state dict (same key
  names as open_clip's, float16 tensors).

The architecture comes from open_clip's registered model configs (``model_name``), never from the hub or
from the file; only the image tower's keys (``visual.*``) are read and they must match it exactly. The text
tower is built (open_clip builds whole models) and dropped at once.

The activation is not in the weights: OpenAI's CLIP was trained with QuickGELU, open_clip's ``ViT-L-14``
config uses nn.GELU. A TorchScript archive is OpenAI's release, so it gets QuickGELU; for OpenAI weights in
a plain state dict pass ``force_quick_gelu=True`` (the ``clip_vit_l14`` preset does), for LAION/DataComp
weights leave it False. Likewise the normalisation: OpenAI's mean/std by default (right for OpenAI and most
open_clip ViT-L-14 releases); ``laion2b_s32b_b82k`` needs ``image_mean=image_std=(0.5, 0.5, 0.5)``.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor, nn

__all__ = ["TINY_MODEL_NAME", "ClipVisualEncoder", "build_clip_encoder", "load_clip_encoder"]

logger = logging.getLogger(__name__)

# open_clip model configs shipped with this package (a tiny ViT for tests and the CPU demo), registered on
# import so that ``model_name`` can name them like open_clip's own configs.
OPEN_CLIP_CONFIG_DIR = Path(__file__).with_name("open_clip_configs")
open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
TINY_MODEL_NAME = "moka-tiny-vit"

# Entries of OpenAI's TorchScript state dicts that are not weights (open_clip drops them too).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class ClipVisualEncoder(nn.Module):
    """A frozen open_clip ``VisionTransformer`` returning the patch tokens of block ``layer``.

    Images ``[B, 3, H, W] -> [B, N, D]``, videos ``[B, F, 3, H, W] -> [B, F, N, D]`` (all frames in one
    batched call), N = ``num_patches``, D = ``hidden_size``. Always in eval mode (``train()`` is a no-op, so
    a parent's ``.train()`` cannot switch on patch dropout), no parameter requires grad.
    """

    def __init__(self, visual: VisionTransformer, layer: int = -2) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"expected open_clip's VisionTransformer image tower, got {type(visual).__name__}: patch tokens of "
                "a block are only defined for ViT towers"
            )
        num_blocks = len(visual.transformer.resblocks)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"layer {layer} is out of range for {num_blocks} transformer blocks")
        self.visual = visual
        self.layer = layer
        # What create_model_and_transforms returns as ``preprocess_val`` for this tower.
        self.transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(visual)), is_train=False)
        self.requires_grad_(False)
        super().train(False)

    @property
    def hidden_size(self) -> int:
        """Width D of the tokens (1024 for ViT-L/14): the projector's ``encoder_width``."""
        return self.visual.transformer.width

    @property
    def num_patches(self) -> int:
        """Patch tokens per image N (256 for ViT-L/14 at 224 px); prefix tokens are not counted."""
        rows, cols = self.visual.grid_size
        return rows * cols

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the tower takes; its positional embedding is fixed to this grid."""
        return tuple(self.visual.image_size)

    def train(self, mode: bool = True) -> ClipVisualEncoder:
        """Stay in eval mode: the encoder is frozen, whatever the model around it does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """Patch tokens of preprocessed pixels: ``[B, 3, H, W] -> [B, N, D]``, ``[B, F, 3, H, W] -> [B, F, N, D]``.

        The output has the tower's dtype and device (pixels are moved there).
        """
        expected = (3, *self.image_size)
        if pixels.dim() not in (4, 5) or tuple(pixels.shape[-3:]) != expected:
            raise ValueError(
                f"expected pixels [B, 3, H, W] or [B, F, 3, H, W] with (3, H, W) = {expected}, "
                f"got shape {tuple(pixels.shape)}"
            )
        leading = pixels.shape[:-3]
        weight = self.visual.conv1.weight
        images = pixels.reshape(-1, *expected).to(device=weight.device, dtype=weight.dtype)
        out = self.visual.forward_intermediates(
            images,
            indices=[self.layer],  # a list: the block at this index (an int would mean "the last n")
            stop_early=True,  # the blocks after ``layer`` are not run
            normalize_intermediates=False,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=False,  # prefix (CLS) tokens are split off and dropped
        )
        tokens = out["image_intermediates"][0]
        return tokens.reshape(*leading, *tokens.shape[1:])

    def encode_segments(self, media: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, None]:
        """The multimodal model's entry point: patch tokens [S, N, D] of S preprocessed images or frames
        [S, 3, H, W]; every token is real, so no mask."""
        if lengths is not None:
            raise ValueError("images and video frames have no lengths; pass lengths only for audio and speech")
        return self(media), None

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> Tensor:
        """open_clip's inference preprocessing (resize, centre crop, RGB, normalise): ``[N, 3, H, W]`` float32.

        Takes one PIL image or a sequence of them; one image gives N = 1.
        """
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        return torch.stack([self.transform(image) for image in images])

    def preprocess_frames(self, frames: np.ndarray | Tensor) -> Tensor:
        """Decoded video frames, uint8 ``[F, H, W, 3]`` RGB (PyAV's ``frame.to_ndarray(format="rgb24")``
        stacked), -> ``[F, 3, H', W']``, each frame preprocessed exactly as a PIL image would be."""
        array = frames.numpy(force=True) if isinstance(frames, Tensor) else np.asarray(frames)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
            raise ValueError(f"expected uint8 RGB frames [F, H, W, 3], got {array.dtype} array of shape {array.shape}")
        return self.preprocess([Image.fromarray(frame) for frame in array])


def _drop_random_init_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded for model")


def build_clip_encoder(
    model_name: str,
    layer: int = -2,
    *,
    force_quick_gelu: bool = False,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    seed: int | None = None,
) -> ClipVisualEncoder:
    """A randomly initialised encoder of a registered open_clip config (tests, the demo).

    Random weights are only ever built on purpose: ``load_clip_encoder`` requires a checkpoint.
    ``image_mean``/``image_std`` default to open_clip's (OpenAI's constants). ``seed`` makes the weights
    reproducible, so features cached by one process match the encoder another process builds.
    """
    if seed is not None:
        torch.manual_seed(seed)
    # Only registered names: open_clip resolves "hf-hub:" / "local-dir:" names by reading the hub or a folder.
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"{model_name!r} is not a registered open_clip model config (hub names are not accepted, nothing is "
            f"downloaded); see open_clip.list_models() ({len(open_clip.list_models())} names, e.g. 'ViT-L-14', "
            f"{TINY_MODEL_NAME!r})"
        )
    config = open_clip.get_model_config(model_name)
    # Building timm or Hugging Face towers reads their configs (or weights) from the hub.
    if "timm_model_name" in config["vision_cfg"] or "hf_model_name" in config["text_cfg"]:
        raise ValueError(f"{model_name!r} has a timm or Hugging Face tower; only open_clip's own ViT configs are built")
    force_preprocess_cfg = {
        key: tuple(value) for key, value in (("mean", image_mean), ("std", image_std)) if value is not None
    }
    # open_clip warns on the root logger that no pretrained weights were loaded: random weights are what this
    # builds (load_clip_encoder loads its checkpoint next), so every demo run need not print it.
    root = logging.getLogger()
    root.addFilter(_drop_random_init_notice)
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=None,
            force_quick_gelu=force_quick_gelu,
            force_preprocess_cfg=force_preprocess_cfg,
            pretrained_image=False,
            pretrained_text=False,
        )
    finally:
        root.removeFilter(_drop_random_init_notice)
    # Keep the image tower only; the text tower (123M parameters for ViT-L-14) is freed with ``model``.
    return ClipVisualEncoder(model.visual, layer)


def load_clip_encoder(
    model_name: str = "ViT-L-14",
    checkpoint: str | os.PathLike | None = None,
    layer: int = -2,
    *,
    force_quick_gelu: bool = False,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> ClipVisualEncoder:
    """The image tower of ``model_name`` with the weights of a local ``checkpoint`` (formats: module docstring).

    ``checkpoint`` None is an error (a forgotten path must not give random weights; ``build_clip_encoder`` is
    the explicit way). The file's ``visual.*`` keys must match the config exactly; a missing file raises
    FileNotFoundError, an unreadable file or mismatching keys or shapes raise ValueError, naming the file.
    """
    if checkpoint is None:
        raise ValueError(
            "load_clip_encoder needs a local checkpoint (open_clip_pytorch_model.bin or OpenAI's ViT-L-14.pt); "
            "use build_clip_encoder for random weights"
        )
    path = Path(checkpoint)
    if path.is_dir():  # the official code's Hugging Face folder (openai-clip-vit-large-patch14-224), say
        raise ValueError(
            f"CLIP checkpoint {path} is a folder: name the weights file, OpenAI's ViT-L-14.pt or open_clip's "
            "open_clip_pytorch_model.bin / .safetensors (a Hugging Face CLIPVisionModel folder is not read)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist (nothing is downloaded)")
    state, torchscript = _read_state_dict(path)
    if torchscript and not force_quick_gelu:
        logger.info("%s is a TorchScript archive (OpenAI's release): using QuickGELU as OpenAI's CLIP does", path)
    encoder = build_clip_encoder(
        model_name,
        layer,
        force_quick_gelu=force_quick_gelu or torchscript,
        image_mean=image_mean,
        image_std=image_std,
    )
    visual_state = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    expected = set(encoder.visual.state_dict())
    missing, unexpected = sorted(expected - set(visual_state)), sorted(set(visual_state) - expected)
    if missing or unexpected:
        hugging_face = any(key.startswith("vision_model.") for key in state)
        raise ValueError(
            f"{path}: image tower keys do not match open_clip's {model_name!r}: missing {len(missing)} "
            f"{missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]} (keys read with the 'visual.' prefix)"
            + ("; this is a Hugging Face CLIP checkpoint (vision_model.*), which is not read" if hugging_face else "")
        )
    try:
        encoder.visual.load_state_dict(visual_state, strict=True)
    except RuntimeError as error:  # shape mismatches: another size of the same architecture
        raise ValueError(f"{path}: weights do not fit open_clip's {model_name!r}: {error}") from error
    return encoder


def _read_state_dict(path: Path) -> tuple[dict[str, Tensor], bool]:
    """The file's state dict and whether it was a TorchScript archive (OpenAI's ``ViT-L-14.pt``)."""
    torchscript = _is_torchscript_archive(path)
    try:
        if torchscript:
            # torch.load(weights_only=True) refuses TorchScript archives; jit.load runs no pickled Python.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                loaded = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in _TORCHSCRIPT_EXTRA_KEYS:
                loaded.pop(key, None)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            # mmap: the ViT-L-14 file also holds the text tower, which is never copied into memory.
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise ValueError(f"{path} could not be read as a CLIP checkpoint: {error}") from error
    # open_clip training checkpoints wrap the weights, DDP prefixes them.
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, Tensor) for v in loaded.values()):
        found = sorted(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(f"{path} is not a CLIP state dict (expected a non-empty dict of tensors, found {found})")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key.removeprefix("module."): value for key, value in loaded.items()}
    return loaded, torchscript


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files holding ``constants.pkl``, which torch.save never writes."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
