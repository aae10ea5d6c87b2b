"""moka-train: multimodal LLM fine-tuning with MokA and the adapters it is measured against."""

from moka_train.modality import Modality

__version__ = "0.1.0"
__all__ = ["Modality", "__version__"]
