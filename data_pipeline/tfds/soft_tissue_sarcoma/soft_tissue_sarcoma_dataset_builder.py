"""TFDS builder `soft_tissue_sarcoma`: preprocessed 2-D slices of one domain, from a DICOM root.

Builds and reads without TensorFlow:

    import tensorflow_datasets as tfds
    import data_pipeline.tfds.soft_tissue_sarcoma  # registers the builder

    builder = tfds.builder("soft_tissue_sarcoma/ct_128", data_dir=DATA_DIR)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=DICOM_ROOT))
    train = builder.as_data_source()["train"]    # or tfds.data_source("soft_tissue_sarcoma/ct_128")

and `data_pipeline.loader.train_batches(train, batch_size, seed)` batches it. What needs TF in
tfds 4.9: `tfds.load` / `as_dataset`, the tfrecord file format, the `tfds build` CLI and
`tfds.testing.DatasetBuilderTestCase`; so we write array_record and read with `as_data_source`
(`tfds.testing.mock_data` works for it too, given a split). No Beam: the examples come from one
Python generator, which is plenty for a few thousand slices.

The manual dir is the DICOM root (any layout, e.g. the TCIA download); the builder ingests it once
with `data_pipeline.ingest` into `<data_dir>/downloads/soft_tissue_sarcoma_index/` (cached, keyed
by the folder's contents and the split settings) and every config reuses that. A manual dir that
already holds an ingested index (`index.sqlite`) is used as it is.
"""

import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import datasets, vocabulary
from data_pipeline import index as index_lib
from data_pipeline import preprocess as preprocess_lib

_DESCRIPTION = """
Soft-tissue sarcoma segmentation slices (TCIA collection "Soft-tissue-Sarcoma", Vallieres et al.
2015): per patient a PET/CT study and an MR study (T1, T2 fat-saturated or STIR), each with an
RTSTRUCT outlining the tumour (GTV_Mass). Each example is one 2-D slice of one domain, resized to
image_size x image_size by nearest neighbour and min-max scaled to [0, 1] (thesis §13.2), with its
tumour mask resized by the same map. Splits are fixed per patient at ingest
(data_pipeline.splits). By default only slices that contain tumour are included.
"""

_CITATION = """
@article{vallieres2015radiomics,
  title={A radiomics model from joint FDG-PET and MRI texture features for the prediction of lung
         metastases in soft-tissue sarcomas of the extremities},
  author={Valli{\\`e}res, Martin and Freeman, Carolyn R and Skamene, Sonia R and El Naqa, Issam},
  journal={Physics in Medicine and Biology},
  volume={60},
  number={14},
  pages={5471},
  year={2015}
}
"""

_HOMEPAGE = "https://www.cancerimagingarchive.net/collection/soft-tissue-sarcoma/"

_MANUAL_DOWNLOAD_INSTRUCTIONS = """
The collection is on The Cancer Imaging Archive (TCIA), free after accepting its data usage policy:
https://www.cancerimagingarchive.net/collection/soft-tissue-sarcoma/

Either
  * download the collection's .tcia manifest from that page and open it with the NBIA Data
    Retriever (https://wiki.cancerimagingarchive.net/display/NBIA/Downloading+Images+Using+the+NBIA+Data+Retriever);
    either directory layout it offers works, nothing here depends on folder names; or
  * use the TCIA REST API, e.g. with tcia_utils (pip install tcia_utils):
        from tcia_utils import nbia
        series = nbia.getSeries(collection="Soft-tissue-Sarcoma")
        nbia.downloadSeries(series, path="DICOM_ROOT")

Then pass the folder that holds the downloaded DICOM (all patients, all modalities and their
RTSTRUCTs; it is searched recursively) as manual_dir:
    tfds.download.DownloadConfig(manual_dir="DICOM_ROOT")
A folder with an index made by `python -m data_pipeline.ingest` (index.sqlite) can be given as
manual_dir instead.
"""

# Domain names (data_pipeline.vocabulary.DOMAINS) and the prefixes of their config names.
_CONFIG_PREFIXES = {"CT": "ct", "PT": "pt", "T1": "mr_t1", "T2": "mr_t2", "STIR": "mr_stir"}
_IMAGE_SIZES = (64, 128)


@dataclasses.dataclass
class SoftTissueSarcomaConfig(tfds.core.BuilderConfig):
    """Which slices and how they are preprocessed.

    Attributes:
      domain: 'CT', 'PT', 'T1', 'T2' or 'STIR' (MR sequences).
      image_size: height and width of the examples in pixels.
      tumour_only: only slices whose mask has tumour (the default selection); False for all.
      split_scheme: 'patient' or 'thesis' (data_pipeline.splits), used when ingesting DICOM.
      split_seed: seed of the split assignment, used when ingesting DICOM.
    """

    domain: str = "CT"
    image_size: int = preprocess_lib.DEFAULT_IMAGE_SIZE
    tumour_only: bool = True
    split_scheme: str = "patient"
    split_seed: int = 0


def _make_configs() -> list[SoftTissueSarcomaConfig]:
    configs = []
    for split_scheme, suffix in (("patient", ""), ("thesis", "_thesis")):
        for image_size in _IMAGE_SIZES:
            for domain, prefix in _CONFIG_PREFIXES.items():
                configs.append(
                    SoftTissueSarcomaConfig(
                        name=f"{prefix}_{image_size}{suffix}",
                        description=(
                            f"{domain} tumour slices at {image_size}x{image_size}, "
                            f"{split_scheme} splits (seed 0)."
                        ),
                        domain=domain,
                        image_size=image_size,
                        split_scheme=split_scheme,
                    )
                )
    return configs


BUILDER_CONFIGS = _make_configs()


class Builder(tfds.core.GeneratorBasedBuilder):
    """Preprocessed slices of one domain of the TCIA Soft-tissue-Sarcoma collection."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = BUILDER_CONFIGS
    DEFAULT_CONFIG_NAME = "ct_128"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    # (h, w, 1) in [0, 1], min-max per image.
                    "image": tfds.features.Tensor(
                        shape=(size, size, 1), dtype=np.float32, encoding="zlib"
                    ),
                    # (h, w, 1) in {0, 1}: 1 = tumour (GTV_Mass).
                    "mask": tfds.features.Tensor(
                        shape=(size, size, 1), dtype=np.uint8, encoding="zlib"
                    ),
                    "patient_key": tfds.features.Text(),
                    "modality": tfds.features.Text(),  # 'CT', 'PT' or 'MR'.
                    "sequence": tfds.features.Text(),  # MR: 'T1', 'T2', 'STIR'; else ''.
                    "series_key": tfds.features.Text(),
                    "slice_index": tfds.features.Scalar(dtype=np.int32),
                    # Position along the slice normal (ImagePositionPatient . normal).
                    "slice_position_mm": tfds.features.Scalar(dtype=np.float32),
                    "has_tumor": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            supervised_keys=("image", "mask"),
            homepage=_HOMEPAGE,
            citation=_CITATION,
            # Examples stay in index order (patient, series, slice): evaluation passes are ordered
            # and the loader shuffles for training.
            disable_shuffling=True,
        )

    def _open_index(self, dl_manager: tfds.download.DownloadManager) -> index_lib.Index:
        config = self.builder_config
        manual_dir = pathlib.Path(dl_manager.manual_dir)
        if (manual_dir / index_lib.INDEX_FILENAME).is_file():
            index = datasets.get_index("index", manual_dir)
            meta = index.meta()
            if (meta["split_scheme"], meta["seed"]) != (config.split_scheme, config.split_seed):
                raise datasets.DatasetError(
                    f"the index in {manual_dir} has {meta['split_scheme']} splits with seed "
                    f"{meta['seed']}, config {config.name} wants {config.split_scheme} with seed "
                    f"{config.split_seed}"
                )
            return index
        return datasets.get_index(
            "dicom",
            manual_dir,
            cache_dir=pathlib.Path(dl_manager.download_dir) / "soft_tissue_sarcoma_index",
            seed=config.split_seed,
            split_scheme=config.split_scheme,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        index = self._open_index(dl_manager)
        generators = {}
        for split in vocabulary.SPLITS:
            records = index.query(**datasets.domain_query(config.domain, split, config.tumour_only))
            # tfds cannot write an empty split; a split without slices is left out.
            if records:
                generators[split] = self._generate_examples(records)
        if not generators:
            raise datasets.DatasetError(
                f"no {config.domain} slices{' with tumour' if config.tumour_only else ''} in "
                f"{dl_manager.manual_dir}"
            )
        return generators

    def _generate_examples(self, records: list[index_lib.SliceRecord]):
        image_size = self.builder_config.image_size
        for record in records:
            image, mask = preprocess_lib.preprocess(*record.load(), image_size=image_size)
            yield (
                f"{record.series_key}/{record.slice_index:05d}",
                {
                    "image": image,
                    "mask": mask,
                    "patient_key": record.patient_key,
                    "modality": record.modality,
                    "sequence": record.sequence or "",
                    "series_key": record.series_key,
                    "slice_index": record.slice_index,
                    "slice_position_mm": record.position_mm,
                    "has_tumor": record.has_tumor,
                },
            )
