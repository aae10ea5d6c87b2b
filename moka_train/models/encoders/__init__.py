"""Frozen media encoders (CLIP via open_clip, BEATs, Whisper) loaded from local checkpoints."""
