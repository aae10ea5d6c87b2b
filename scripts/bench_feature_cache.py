"""Time of a training step with cached encoder features against on-the-fly encoding, with real-size encoders.

    python scripts/bench_feature_cache.py                 # CPU: ViT-L/14 + BEATs-base (random weights), minutes
    python scripts/bench_feature_cache.py --quick         # tiny encoders, seconds (what the tests run)
    python scripts/bench_feature_cache.py --device cuda --json cache_bench.json

A step is what a training loop does per batch: read the batch's samples (MUSIC-AVQA layout: mp4 files with
a sound track, 10 frames and ten 2 s audio windows per question), collate them, forward, backward and an
AdamW step on the trainables (projectors, added rows, MokA adapter). On the fly, the samples are decoded
and run through the frozen encoders (CLIP ViT-L/14 at 224 px and BEATs-base: the official sizes, random
weights since nothing is downloaded); cached, the same samples read their features from a ``FeatureCache``
filled beforehand (its filling time is reported too). Both paths use the same model, records and
batches; the script first checks that they give the same loss.

What the ratio means depends on the LLM: the encoders' cost is fixed, the step's grows with the backbone.
``--llm`` picks a backbone that fits the machine (``small``: 4 layers, hidden 1024, the CPU default;
``tiny``: the demo's); on a GPU with a 7B backbone the ratio is smaller than on the CPU with these.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from omegaconf import OmegaConf

from moka_train.adapters import AdapterConfig
from moka_train.benchmarking import machine_info, synchronize
from moka_train.data.caching import fill_feature_caches, open_caches
from moka_train.data.collate import MultimodalCollator, batch_to_device
from moka_train.data.dataset import MultimodalDataset
from moka_train.data.datasets.music_avqa import build_music_avqa
from moka_train.data.media import build_media_loader
from moka_train.models.backbones import build_random_backbone
from moka_train.models.build import build_multimodal_lm
from moka_train.models.encoders.beats import build_beats, tiny_beats_config
from moka_train.models.encoders.clip import build_clip_encoder
from moka_train.models.tokenizer import build_demo_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MEDIA = {"frames": 10, "audio_windows": "music_avqa"}
LLMS = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16
    ),
}
# BEATs_iter3+ sizes (12 layers, 768 wide, deep norm, gated relative positions) with random weights.
BEATS_BASE = dict(
    embed_dim=512,
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    conv_pos=128,
    conv_pos_groups=16,
)


def write_dataset(root: Path, videos: int, seconds: float, size: int) -> None:
    """A MUSIC-AVQA-layout folder: ``videos`` mp4s (moving noise, AAC sound) with one question each."""
    (root / "json_update").mkdir(parents=True)
    (root / "MUSIC-AVQA-Videos").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for index in range(videos):
        video_id = f"{index:08d}"
        rows.append(
            {
                "video_id": video_id,
                "question_id": index,
                "type": '["Audio-Visual", "Counting"]',
                "question_content": "How many <Object> are in the entire video?",
                "templ_values": '["violins"]',
                "question_deleted": 0,
                "anser": "two",
            }
        )
        fps, rate = 10, 44100
        with av.open(str(root / "MUSIC-AVQA-Videos" / f"{video_id}.mp4"), "w") as out:
            video = out.add_stream("libx264", rate=fps)
            video.width = video.height = size
            video.pix_fmt = "yuv420p"
            video.options = {"preset": "ultrafast"}
            audio = out.add_stream("aac", rate=rate, layout="mono")
            for _ in range(int(seconds * fps)):
                frame = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
            for start in range(0, tone.size, 1024):
                chunk = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="flt", layout="mono")
                chunk.sample_rate = rate
                out.mux(audio.encode(chunk))
            out.mux(video.encode(None))
            out.mux(audio.encode(None))
    (root / "json_update" / "avqa-test.json").write_text(json.dumps(rows))


def build_model(args: argparse.Namespace, device: torch.device):
    if args.quick:
        clip, clip_cfg = build_clip_encoder("moka-tiny-vit", seed=0), {"model_name": "moka-tiny-vit", "seed": 0}
        beats_cfg = {f: getattr(tiny_beats_config(), f) for f in ("embed_dim", "encoder_layers", "encoder_embed_dim")}
        beats = build_beats(tiny_beats_config(), seed=0)
        projector = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "projector" / "qformer_tiny.yaml"))
    else:
        clip = build_clip_encoder("ViT-L-14", seed=0, force_quick_gelu=True)
        clip_cfg = {"model_name": "ViT-L-14", "seed": 0, "force_quick_gelu": True}
        beats_cfg = dict(BEATS_BASE, seed=0)
        beats = build_beats(tiny_beats_config(**BEATS_BASE, finetuned_model=False), seed=0)
        projector = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "projector" / "qformer_official.yaml"))
    tokenizer = build_demo_tokenizer()
    backbone = build_random_backbone("llama", seed=0, vocab_size=384, **LLMS[args.llm])
    model = build_multimodal_lm(
        backbone,
        tokenizer,
        encoders={"visual": clip, "audio": beats},
        projector=projector,
        adapter=AdapterConfig(method="moka", dropout=0.05),
        chat_template="llama2_official",
        stage="instruct",
    ).to(device)
    return model, tokenizer, {"visual": clip_cfg, "audio": beats_cfg}


def time_steps(model, optimizer, dataset, collator, batches: list[list[int]], device, warmup: int) -> list[float]:
    """Seconds per step: reading the samples, collating, forward, backward, optimizer step."""
    times = []
    for step, indices in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        batch = batch_to_device(collator([dataset[i] for i in indices]), device)
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def first_loss(model, dataset, collator, indices: list[int], device) -> float:
    with torch.no_grad():
        return float(model(batch_to_device(collator([dataset[i] for i in indices]), device)).loss)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny encoders and clips (seconds)")
    parser.add_argument(
        "--llm", choices=sorted(LLMS), default=None, help="backbone size (default: small; tiny if --quick)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.llm = args.llm or ("tiny" if args.quick else "small")
    device = torch.device(args.device)
    torch.manual_seed(0)
    steps = args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "avqa"
        write_dataset(
            root, videos=args.batch * steps, seconds=4.0 if args.quick else 20.0, size=32 if args.quick else 224
        )
        records = build_music_avqa(root, split="test")
        model, tokenizer, encoder_cfgs = build_model(args, device)
        tokens = {m: p.config.num_queries for m, p in model.projectors.items()}
        raw = MultimodalDataset(records, loader=build_media_loader(MEDIA, model.encoders["visual"]))
        caches = open_caches(Path(tmp) / "cache", encoder_cfgs, MEDIA)
        start = time.perf_counter()
        fill_feature_caches(records, dict(model.encoders), caches, raw.loader, device=device)
        fill_seconds = time.perf_counter() - start
        cached = MultimodalDataset(records, caches=caches)
        raw_collate = MultimodalCollator(tokenizer, tokens, media_kind="raw")
        cached_collate = MultimodalCollator(tokenizer, tokens, media_kind="features")
        batches = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(steps)]
        model.eval()  # dropout off for the equality check only
        losses = (
            first_loss(model, raw, raw_collate, batches[0], device),
            first_loss(model, cached, cached_collate, batches[0], device),
        )
        if abs(losses[0] - losses[1]) > 1e-4 * max(1.0, abs(losses[0])):
            raise SystemExit(f"cached and on-the-fly batches give different losses: {losses}")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        on_the_fly = time_steps(model, optimizer, raw, raw_collate, batches, device, warmup=1)
        from_cache = time_steps(model, optimizer, cached, cached_collate, batches, device, warmup=1)
    report = {
        "machine": {**machine_info(device), "device": str(device)},
        "encoders": "tiny" if args.quick else "CLIP ViT-L/14 224 px + BEATs-base (random weights)",
        "llm": args.llm,
        "batch": args.batch,
        "per_sample": "10 frames + ten 2 s audio windows",
        "on_the_fly_s": statistics.median(on_the_fly),
        "cached_s": statistics.median(from_cache),
        "speedup": statistics.median(on_the_fly) / statistics.median(from_cache),
        "cache_fill_s_per_sample": fill_seconds / len(records),
        "loss_check": losses,
    }
    print(
        f"{report['encoders']}, LLM {args.llm}, batch {args.batch} ({report['per_sample']}), {device}, "
        f"{report['machine']['threads']} threads, commit {report['machine']['commit']}\n"
        f"| path | s / step |\n| --- | ---: |\n| on the fly | {report['on_the_fly_s']:.2f} |\n"
        f"| cached features | {report['cached_s']:.2f} |\n"
        f"speed-up {report['speedup']:.1f}x; filling the cache took "
        f"{report['cache_fill_s_per_sample']:.2f} s per sample"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
