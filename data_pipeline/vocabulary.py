"""The data's vocabulary, defined once: modalities, MR sequences, domains, splits.

Every module that names a modality, a domain or a split imports it from here (data_pipeline's own
and sarcoma_jax's alike).
"""

# DICOM Modality values of the image series the ingest indexes.
IMAGE_MODALITIES = ("CT", "PT", "MR")
# MR series are classified further by sequence (dicom_io.classify_mr_sequence).
MR_SEQUENCES = ("T1", "T2", "STIR")
# What a model is trained on or adapted between: a modality, with MR split by sequence.
DOMAINS = ("CT", "PT", *MR_SEQUENCES)
# Other spellings users write for the domains (upper case).
DOMAIN_ALIASES = {"PET": "PT", "MR_T1": "T1", "MR_T2": "T2", "T2FS": "T2", "MR_STIR": "STIR"}
# The index's splits, in this order everywhere.
SPLITS = ("train", "val", "test")
