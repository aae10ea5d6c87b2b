"""The CLIP image encoder on the tiny open_clip config: patch tokens against forward hooks on open_clip's own
blocks, videos against images, loading every local checkpoint format offline, strict errors naming the
file, freezing, and preprocessing against open_clip's transform."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from moka_train.models.encoders.clip import (
    TINY_MODEL_NAME,
    ClipVisualEncoder,
    build_clip_encoder,
    load_clip_encoder,
)

CONFIGS = Path(__file__).parents[1] / "configs" / "encoder" / "visual"
NUM_BLOCKS = 3  # moka-tiny-vit: 32 px, 8 px patches -> 16 patch tokens of width 64


@pytest.fixture(scope="module")
def clip_model() -> open_clip.CLIP:
    """A whole open_clip CLIP (text tower included), as checkpoints are saved from."""
    torch.manual_seed(0)
    return open_clip.create_model(TINY_MODEL_NAME, pretrained=None).eval()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the hub's offline switch, and any socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def pixels(*leading: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*leading, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def encoder_with(state: dict[str, torch.Tensor], layer: int = -2, quick_gelu: bool = False) -> ClipVisualEncoder:
    encoder = build_clip_encoder(TINY_MODEL_NAME, layer, force_quick_gelu=quick_gelu)
    encoder.visual.load_state_dict({k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})
    return encoder


@pytest.mark.parametrize("layer", [-2, 0, -1])
def test_patch_tokens_equal_a_hook_on_the_block(clip_model, layer):
    encoder = encoder_with(clip_model.state_dict(), layer)
    captured = []
    block = encoder.visual.transformer.resblocks[layer]
    handle = block.register_forward_hook(lambda module, args, output: captured.append(output))
    x = pixels(2)
    with torch.no_grad():
        encoder.visual(x)  # open_clip's own full forward
    handle.remove()
    tokens = encoder(x)
    assert tokens.shape == (2, encoder.num_patches, encoder.hidden_size) == (2, 16, 64)
    torch.testing.assert_close(tokens, captured[0][:, 1:], rtol=0, atol=0)  # CLS dropped


def test_penultimate_is_the_default_and_layers_differ(clip_model):
    x = pixels(1)
    default = encoder_with(clip_model.state_dict())
    assert default.layer == -2
    torch.testing.assert_close(default(x), encoder_with(clip_model.state_dict(), NUM_BLOCKS - 2)(x), rtol=0, atol=0)
    assert not torch.allclose(default(x), encoder_with(clip_model.state_dict(), -1)(x))


def test_video_frames_equal_images(clip_model):
    encoder = encoder_with(clip_model.state_dict())
    video = pixels(2, 3, seed=1)
    tokens = encoder(video)
    assert tokens.shape == (2, 3, 16, 64)
    for b in range(2):
        for f in range(3):
            torch.testing.assert_close(tokens[b, f], encoder(video[b, f][None])[0], rtol=1e-5, atol=1e-6)


def _open_clip_file(state, path):
    torch.save(state, path)


def _openai_fp16_file(state, path):
    # OpenAI's release stores its (same-named) weights in float16.
    torch.save({k: v.half() for k, v in state.items()}, path)


def _safetensors_file(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _training_checkpoint_file(state, path):
    # open_clip's training loop saves DDP-prefixed weights next to the optimizer state.
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


FORMATS = {
    # name: (writer, file name, the weights the tower should end up with, QuickGELU expected)
    "open_clip": (_open_clip_file, "open_clip_pytorch_model.bin", lambda v: v, False),
    "openai_state_dict": (_openai_fp16_file, "ViT-L-14-state-dict.pt", lambda v: v.half().float(), False),
    "safetensors": (_safetensors_file, "open_clip_model.safetensors", lambda v: v, False),
    "open_clip_training_checkpoint": (_training_checkpoint_file, "epoch_3.pt", lambda v: v, False),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_loads_local_state_dicts_offline(clip_model, tmp_path, offline, name):
    write, file_name, expected_value, quick_gelu = FORMATS[name]
    path = tmp_path / file_name
    write(clip_model.state_dict(), path)
    loaded = load_clip_encoder(TINY_MODEL_NAME, path)
    expected = {k: expected_value(v) for k, v in clip_model.state_dict().items()}
    for key, value in loaded.visual.state_dict().items():
        assert torch.equal(value, expected[f"visual.{key}"]), key
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU) == quick_gelu
    x = pixels(2)
    torch.testing.assert_close(loaded(x), encoder_with(expected)(x), rtol=0, atol=0)


def test_openai_weights_with_quick_gelu_match_open_clip_loading(clip_model, tmp_path, offline):
    """OpenAI-format weights with force_quick_gelu equal open_clip's own loader given the same file."""
    path = tmp_path / "ViT-L-14-state-dict.pt"
    _openai_fp16_file(clip_model.state_dict(), path)
    loaded = load_clip_encoder(TINY_MODEL_NAME, path, force_quick_gelu=True)
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    reference = open_clip.create_model(TINY_MODEL_NAME, pretrained=str(path), force_quick_gelu=True).eval()
    x = pixels(2)
    with torch.no_grad():
        out = reference.visual.forward_intermediates(
            x, indices=[-2], output_fmt="NLC", intermediates_only=True, normalize_intermediates=False
        )
    torch.testing.assert_close(loaded(x), out["image_intermediates"][0], rtol=0, atol=0)


def test_loads_a_torchscript_archive_offline_with_quick_gelu(clip_model, tmp_path, offline):
    """OpenAI's ViT-L-14.pt is a TorchScript archive; a scripted open_clip model stands in for it."""
    path = tmp_path / "ViT-L-14.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        torch.jit.save(torch.jit.script(clip_model), str(path))
    loaded = load_clip_encoder(TINY_MODEL_NAME, path)
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # OpenAI's activation
    x = pixels(2)
    expected = encoder_with(clip_model.state_dict(), quick_gelu=True)
    torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


def test_missing_file_and_forgotten_path(tmp_path, offline):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_clip_encoder(TINY_MODEL_NAME, missing)
    with pytest.raises(ValueError, match="needs a local checkpoint"):
        load_clip_encoder(TINY_MODEL_NAME)
    # The official code's checkpoint is a Hugging Face folder: said so, not "does not exist".
    folder = tmp_path / "openai-clip-vit-large-patch14-224"
    folder.mkdir()
    with pytest.raises(ValueError, match=f"CLIP checkpoint {folder} is a folder: name the weights file"):
        load_clip_encoder(TINY_MODEL_NAME, folder)
    hugging_face = folder / "pytorch_model.bin"
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1)}, hugging_face)
    with pytest.raises(ValueError, match=r"a Hugging Face CLIP checkpoint \(vision_model\.\*\), which is not read"):
        load_clip_encoder(TINY_MODEL_NAME, hugging_face)
    with pytest.raises(ValueError, match="not a registered open_clip model config"):
        build_clip_encoder("hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K")


def test_bad_files_raise_naming_the_file(clip_model, tmp_path, offline):
    wrong_keys = tmp_path / "wrong_keys.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1), "text.weight": torch.zeros(1)}, wrong_keys)
    with pytest.raises(ValueError, match=f"{wrong_keys}: image tower keys do not match .*missing"):
        load_clip_encoder(TINY_MODEL_NAME, wrong_keys)

    text_only = tmp_path / "text_only.bin"
    torch.save({k: v for k, v in clip_model.state_dict().items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(ValueError, match=f"{text_only}: image tower keys do not match"):
        load_clip_encoder(TINY_MODEL_NAME, text_only)

    wrong_shape = tmp_path / "wrong_shape.bin"
    state = dict(clip_model.state_dict())
    state["visual.proj"] = torch.zeros(64, 7)
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match=f"{wrong_shape}: weights do not fit"):
        load_clip_encoder(TINY_MODEL_NAME, wrong_shape)

    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match=f"{not_a_dict} is not a CLIP state dict"):
        load_clip_encoder(TINY_MODEL_NAME, not_a_dict)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{garbage} could not be read"):
        load_clip_encoder(TINY_MODEL_NAME, garbage)


def test_frozen_eval_and_no_text_tower(clip_model):
    encoder = encoder_with(clip_model.state_dict())
    assert not encoder.training and not encoder.visual.training
    encoder.train()
    assert not encoder.training and not any(module.training for module in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    assert all(key.startswith("visual.") for key in encoder.state_dict())
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in clip_model.visual.parameters())
    x = pixels(1).requires_grad_(True)
    assert not encoder(x).requires_grad


def test_shapes_and_bad_inputs(clip_model):
    encoder = encoder_with(clip_model.state_dict())
    assert (encoder.hidden_size, encoder.num_patches, encoder.image_size) == (64, 16, (32, 32))
    with pytest.raises(ValueError, match=r"\(3, H, W\) = \(3, 32, 32\)"):
        encoder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expected pixels"):
        encoder(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="out of range for 3 transformer blocks"):
        build_clip_encoder(TINY_MODEL_NAME, layer=3)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


@pytest.mark.parametrize("mean_std", [None, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_preprocess_equals_open_clip_transform(mean_std):
    kwargs = {} if mean_std is None else {"image_mean": mean_std[0], "image_std": mean_std[1]}
    encoder = build_clip_encoder(TINY_MODEL_NAME, **kwargs)
    _, _, preprocess_val = open_clip.create_model_and_transforms(TINY_MODEL_NAME, pretrained=None, **kwargs)
    images = [random_image(50, 70, seed=1), random_image(45, 30, seed=2).convert("L")]
    batch = encoder.preprocess(images)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    for row, image in enumerate(images):
        torch.testing.assert_close(batch[row], preprocess_val(image), rtol=0, atol=0)
    torch.testing.assert_close(encoder.preprocess(images[0]), batch[:1], rtol=0, atol=0)


def test_preprocess_frames_equals_per_frame_pil():
    encoder = build_clip_encoder(TINY_MODEL_NAME)
    frames = np.random.default_rng(3).integers(0, 256, size=(4, 45, 60, 3), dtype=np.uint8)  # PyAV rgb24
    batch = encoder.preprocess_frames(frames)
    assert batch.shape == (4, 3, 32, 32)
    expected = torch.stack([encoder.transform(Image.fromarray(frame)) for frame in frames])
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)
    torch.testing.assert_close(encoder.preprocess_frames(torch.from_numpy(frames)), batch, rtol=0, atol=0)
    assert encoder(batch[None]).shape == (1, 4, 16, 64)  # one video of 4 frames
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        encoder.preprocess_frames(frames.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        encoder.preprocess_frames(frames[0])


def test_config_presets_instantiate(clip_model, tmp_path, offline):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    tiny = instantiate(OmegaConf.load(CONFIGS / "clip_tiny_random.yaml"))
    assert isinstance(tiny, ClipVisualEncoder) and (tiny.hidden_size, tiny.num_patches) == (64, 16)

    preset = OmegaConf.load(CONFIGS / "clip_vit_l14.yaml")
    assert OmegaConf.is_missing(preset, "checkpoint")
    assert (preset.model_name, preset.layer, preset.force_quick_gelu) == ("ViT-L-14", -2, True)
    # The ViT-L-14 preset, pointed at a tiny checkpoint (building ViT-L-14 is too slow for the tests).
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip_model.state_dict(), path)
    preset.model_name, preset.checkpoint = TINY_MODEL_NAME, str(path)
    loaded = instantiate(preset)
    assert isinstance(loaded, ClipVisualEncoder) and loaded.layer == -2
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_building_random_weights_on_purpose_logs_no_warning(caplog):
    """open_clip's "No pretrained weights loaded ... initialized randomly" is what build_clip_encoder means to do
    (and load_clip_encoder loads its checkpoint right after): not a warning in every demo run's log. Other
    root-logger warnings still pass, and the filter is gone afterwards."""
    import logging

    with caplog.at_level(logging.WARNING):
        build_clip_encoder(TINY_MODEL_NAME, seed=0)
        logging.warning("No pretrained weights loaded for model 'x' (after the build: kept)")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["No pretrained weights loaded for model 'x' (after the build: kept)"]
