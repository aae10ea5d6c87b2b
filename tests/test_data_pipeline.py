"""Files on disk to model batches: a MUSIC-AVQA folder (real mp4s written with PyAV), the feature-caching
command, and the same batches from cached features as from on-the-fly encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moka_train.data.caching import open_caches
from moka_train.data.collate import MultimodalCollator
from moka_train.data.dataset import MultimodalDataset
from moka_train.data.media import build_media_loader
from moka_train.data.records import check_media
from moka_train.models.build import build_multimodal_lm
from tests.test_media import write_video

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
ENCODERS = {"visual": "visual/clip_tiny_random", "audio": "audio/beats_tiny_random"}
QUESTIONS = [
    ("00000001", 1, '["Audio-Visual", "Counting"]', "How many <Object> are playing?", '["violins"]', "two"),
    ("00000001", 2, '["Visual", "Location"]', "Where is the <Object>?", '["piano"]', "left"),
    (
        "00000002",
        3,
        '["Audio", "Comparative"]',
        "Is the <Object> louder than the <Object>?",
        '["cello", "flute"]',
        "no",
    ),
]


@pytest.fixture(scope="module")
def avqa_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("MUSIC-AVQA")
    (root / "json_update").mkdir()
    (root / "MUSIC-AVQA-Videos").mkdir()
    rows = [
        {
            "video_id": vid,
            "question_id": qid,
            "type": qtype,
            "question_content": content,
            "templ_values": values,
            "question_deleted": 0,
            "anser": answer,
        }
        for vid, qid, qtype, content, values, answer in QUESTIONS
    ]
    (root / "json_update" / "avqa-test.json").write_text(json.dumps(rows))
    for index, video_id in enumerate(sorted({q[0] for q in QUESTIONS})):
        write_video(
            root / "MUSIC-AVQA-Videos" / f"{video_id}.mp4", num_frames=24 + 12 * index, tone=440.0 * (index + 1)
        )
    return root


def data_config(root: Path, audio_windows: str = "music_avqa"):
    cfg = OmegaConf.load(CONFIGS / "data" / "music_avqa.yaml")
    cfg.builder.root = str(root)
    cfg.media.audio_windows = audio_windows
    return cfg


def run_cache_command(root: Path, cache_dir: Path, *overrides: str) -> str:
    command = [
        sys.executable,
        str(ROOT / "data_prep" / "cache_features.py"),
        "data=music_avqa",
        f"data.builder.root={root}",
        f"cache_dir={cache_dir}",
        "encoder/visual=clip_tiny_random",
        "encoder/audio=beats_tiny_random",
        f"hydra.run.dir={cache_dir.parent / 'hydra'}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("audio_windows", ["music_avqa", "whole"])
def test_cached_features_give_the_batches_of_on_the_fly_encoding(avqa_root, tmp_path, audio_windows):
    """``whole``: the two sound tracks differ in length, so on the fly they are batched padded to the longer;
    the shorter one's features must still be those it has alone, as the cache encodes it."""
    cache_dir = tmp_path / "cache"
    windows = f"data.media.audio_windows={audio_windows}"
    first = run_cache_command(avqa_root, cache_dir, windows)
    assert "4 items encoded, 0 already cached, 0 unreadable" in first  # 2 videos x (frames, sound track)
    if audio_windows == "music_avqa":
        again = run_cache_command(avqa_root, cache_dir, windows)
        assert "0 items encoded, 4 already cached" in again  # resumable: nothing is encoded twice

    model_cfg = OmegaConf.load(CONFIGS / "model" / "tiny_llama.yaml")
    tokenizer = instantiate(model_cfg.tokenizer)
    encoder_cfgs = {m: OmegaConf.load(CONFIGS / "encoder" / f"{p}.yaml") for m, p in ENCODERS.items()}
    model = build_multimodal_lm(
        instantiate(model_cfg.backbone),
        tokenizer,
        encoders={m: instantiate(c) for m, c in encoder_cfgs.items()},
        projector=OmegaConf.load(CONFIGS / "projector" / "qformer_tiny.yaml"),
        chat_template=model_cfg.chat_template,
    ).eval()
    data = data_config(avqa_root, audio_windows)
    records = instantiate(data.builder)
    assert [r.metadata["answer"] for r in records] == ["two", "left", "no"]
    media_cfg = OmegaConf.to_container(data.media)
    tokens = {m: p.config.num_queries for m, p in model.projectors.items()}

    raw = MultimodalDataset(records, loader=build_media_loader(media_cfg, model.encoders["visual"]))
    caches = open_caches(cache_dir, {m: OmegaConf.to_container(c) for m, c in encoder_cfgs.items()}, media_cfg)
    cached = MultimodalDataset(records, caches=caches)
    raw_batch = MultimodalCollator(tokenizer, tokens, media_kind="raw")([raw[i] for i in range(3)])
    cached_batch = MultimodalCollator(tokenizer, tokens, media_kind="features")([cached[i] for i in range(3)])
    for key in ("input_ids", "attention_mask", "labels", "modality_ids", "question_mask"):
        assert torch.equal(raw_batch[key], cached_batch[key]), key
    assert raw_batch["media"]["visual"].shape == (30, 3, 32, 32)  # 10 frames per question
    if audio_windows == "whole":
        first_video, _, second_video = raw_batch["media_lengths"]["audio"].tolist()  # one track per question
        assert second_video > first_video  # 36 frames against 24
    else:
        assert raw_batch["media"]["audio"].shape == (30, 32000)  # ten 2 s windows per question
    with torch.no_grad():
        on_the_fly = model(raw_batch)
        from_cache = model(cached_batch)
    torch.testing.assert_close(from_cache.logits, on_the_fly.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_cache.loss, on_the_fly.loss, rtol=1e-5, atol=1e-5)


def test_cache_is_keyed_by_the_configuration(avqa_root, tmp_path):
    """Features cached for one frame count are not found for another: a stale cache is never read."""
    data = data_config(avqa_root)
    records = instantiate(data.builder)
    visual = {
        "visual": OmegaConf.to_container(OmegaConf.load(CONFIGS / "encoder" / "visual" / "clip_tiny_random.yaml"))
    }
    media = OmegaConf.to_container(data.media)
    caches = open_caches(tmp_path, visual, media)
    other = open_caches(tmp_path, visual, {**media, "frames": 8})
    assert caches["visual"].directory != other["visual"].directory
    dataset = MultimodalDataset(records, caches=open_caches(tmp_path, {**visual, "audio": {}}, media))
    with pytest.raises(KeyError, match="record 'music_avqa/test/1'.*not in the feature cache"):
        dataset[0]


def test_unreadable_media_are_named_or_skipped(avqa_root, tmp_path):
    """A corrupt mp4 passes the existence check, and the probe catches it: an error naming the file and the
    record, or its records left out and counted."""
    import shutil

    root = tmp_path / "avqa"
    shutil.copytree(avqa_root, root)
    broken = root / "MUSIC-AVQA-Videos" / "00000002.mp4"
    broken.write_bytes(broken.read_bytes()[:200])  # the header is cut: nothing decodes
    records = instantiate(data_config(root).builder)
    assert len(check_media(records, "error")) == 3  # it exists
    with pytest.raises(FileNotFoundError, match=r"record 'music_avqa/test/3' cannot read .*00000002\.mp4"):
        check_media(records, "error", probe=True)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 records whose media are missing or unreadable"):
        kept = check_media(records, "skip", probe=True)
    assert [r.id for r in kept] == ["music_avqa/test/1", "music_avqa/test/2"]


def test_video_llava_pretrain_mixes_images_and_videos_in_one_batch(tmp_path):
    """The stage-1 visual corpus from its data config: a real JPEG and a real mp4 in Video-LLaVA's layout, one
    batch holding the image (1 frame) and the video (the config's 8 frames), and a forward with a finite
    loss over both."""
    from PIL import Image

    root = tmp_path / "video-llava"
    (root / "train_json").mkdir(parents=True)
    (root / "llava_image").mkdir()
    (root / "valley").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "llava_image" / "1.jpg")
    write_video(root / "valley" / "2.mp4", num_frames=24)

    def entry(key: str, path: str, human: str, answer: str) -> list[dict]:
        turns = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
        return [{"id": path.split("/")[-1], key: path, "conversations": turns}]

    (root / "train_json" / "llava_image_.json").write_text(
        json.dumps(entry("image", "llava_image/1.jpg", "<image>\nDescribe the image.", "a red square"))
    )
    (root / "train_json" / "valid_valley_.json").write_text(
        json.dumps(entry("video", "valley/2.mp4", "<video>\nDescribe the video.", "colours change"))
    )
    data = OmegaConf.load(CONFIGS / "data" / "video_llava_pretrain.yaml")
    data.builder.root = str(root)
    records = instantiate(data.builder)
    assert [r.id for r in records] == ["llava_image/1.jpg/0", "valley/2.mp4/0"]

    model_cfg = OmegaConf.load(CONFIGS / "model" / "tiny_llama.yaml")
    tokenizer = instantiate(model_cfg.tokenizer)
    model = build_multimodal_lm(
        instantiate(model_cfg.backbone),
        tokenizer,
        encoders={"visual": instantiate(OmegaConf.load(CONFIGS / "encoder" / "visual" / "clip_tiny_random.yaml"))},
        projector=OmegaConf.load(CONFIGS / "projector" / "qformer_tiny.yaml"),
        chat_template=model_cfg.chat_template,
    ).eval()
    media_cfg = OmegaConf.to_container(data.media)
    dataset = MultimodalDataset(records, loader=build_media_loader(media_cfg, model.encoders["visual"]))
    tokens = model.projectors["visual"].config.num_queries
    batch = MultimodalCollator(tokenizer, {"visual": tokens}, media_kind="raw")([dataset[0], dataset[1]])
    assert batch["media"]["visual"].shape[0] == 1 + 8
    visual_tokens = (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum(dim=1)
    video_tokens = (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<video>")).sum(dim=1)
    assert visual_tokens.tolist() == [tokens, 0] and video_tokens.tolist() == [0, 8 * tokens]
    with torch.no_grad():
        output = model(batch)
    assert torch.isfinite(output.loss)
