"""Synthetic soft-tissue-sarcoma DICOM (PET/CT and MR studies, RTSTRUCTs) laid out like TCIA's.

    python -m data_pipeline.phantom --out DIR --patients N --seed S

The package, by concept: `anatomy` (the limb and its tumour), `plan` (one patient's geometry,
identifiers and TCIA quirks, drawn before any pixel), `images` (CT/PET/MR datasets), `structures`
(RTSTRUCTs), `writer` (the collection on disk) and `__main__` (the command line).
"""

from data_pipeline.phantom.anatomy import Anatomy, Lobes, Tissue
from data_pipeline.phantom.images import F18_HALF_LIFE_S
from data_pipeline.phantom.plan import (
    ROI_NAMES,
    SERIES_NAMES,
    SITES,
    Frame,
    PatientPlan,
    SeriesPlan,
    SliceGeometry,
    StructurePlan,
    patient_key,
    plan_patient,
    true_masks,
)
from data_pipeline.phantom.writer import tree_digest, write_patient, write_phantom

__all__ = [
    "F18_HALF_LIFE_S",
    "ROI_NAMES",
    "SERIES_NAMES",
    "SITES",
    "Anatomy",
    "Frame",
    "Lobes",
    "PatientPlan",
    "SeriesPlan",
    "SliceGeometry",
    "StructurePlan",
    "Tissue",
    "patient_key",
    "plan_patient",
    "tree_digest",
    "true_masks",
    "write_patient",
    "write_phantom",
]
