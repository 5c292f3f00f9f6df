"""Installable package: sarcoma_jax (models, training, ADDA), data_pipeline (DICOM to batches)."""

import setuptools

INSTALL_REQUIRES = [
    "absl-py",
    "array_record",
    "clu",
    "etils[epath]",
    "flax",
    "grain",
    "highdicom",  # DICOM-SEG of predictions (sarcoma_jax.predict)
    "isal",  # python-isal: ISA-L deflate for the slice .npz files, 5x zlib at level 1
    "importlib_resources",  # etils needs it for tfds and tfds does not pull it in.
    "jax",
    "matplotlib",
    "medpy",  # HD95 of sarcoma_jax.evaluate (surface distances)
    "ml_collections",
    "nibabel",  # NIfTI masks of predictions
    "numpy",
    "optax",
    "orbax-checkpoint",
    "openpyxl",
    "pillow>=10.1",  # a scalable bundled font for the rendered digits
    "pydicom>=2.4",
    "scikit-image",
    "scikit-learn",
    "threadpoolctl",
    "scipy",
    "tensorflow-datasets",
    "tqdm",
]

setuptools.setup(
    name="sarcoma_jax",
    version="0.1.0",
    description=(
        "Soft-tissue sarcoma segmentation in PET, CT and MR, and unsupervised adversarial "
        "domain adaptation (ADDA) with momentum reset and the confusion score, in JAX/Flax."
    ),
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["sarcoma_jax*", "data_pipeline*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",  # tests/fuzz_test.py
            "nbclient",
            "nbformat",
            "ipykernel",
            "pandas",
            "ruff",
            "dcmqi",  # segimage2itkimage (3D Slicer's SEG converter) reads our SEGs in a test
        ],
        "bench": ["torch==2.13.0"],
        "notebooks": ["pandas", "ipython"],  # colab/*.ipynb (Colab has both already)
    },
)
