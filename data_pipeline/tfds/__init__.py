"""TFDS builders of this package; importing a builder's module registers it with tfds."""
