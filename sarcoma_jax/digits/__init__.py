"""Digits for the §10.1 demonstration: SVHN -> MNIST through tfds, and an offline pair (SPEC §8).

data.py            the offline pair (rendered printed digits -> scikit-learn's handwritten ones)
tfds_builders.py   SVHN and MNIST through tfds without TensorFlow
classifier.py      the source-only LeNet classifier (§10.1 step 1)
task.py            the digits Task of the ADDA game
"""
