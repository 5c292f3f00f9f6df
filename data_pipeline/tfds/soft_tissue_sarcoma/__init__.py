"""The `soft_tissue_sarcoma` TFDS builder (TCIA Soft-tissue-Sarcoma; array_record, no TF)."""

from data_pipeline.tfds.soft_tissue_sarcoma.soft_tissue_sarcoma_dataset_builder import (
    BUILDER_CONFIGS,
    Builder,
    SoftTissueSarcomaConfig,
)

__all__ = ["BUILDER_CONFIGS", "Builder", "SoftTissueSarcomaConfig"]
