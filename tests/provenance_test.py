"""Tests for the run records: collect at the start, add at the end."""

import json
import pathlib
import tempfile

from absl.testing import absltest

from sarcoma_jax import provenance


class ProvenanceTest(absltest.TestCase):

    def test_add_keeps_what_was_recorded_at_the_start(self):
        with tempfile.TemporaryDirectory() as folder:
            path = pathlib.Path(folder) / "provenance.json"
            start = provenance.collect({"seed": 3, "lr": 0.1}, 3)
            provenance.write(path, start)
            provenance.add(path, {"wall_time_s": 12.5, "data": {"train": {"slices": 7}}})
            record = json.loads(path.read_text())
        for key in ("created_utc", "git", "packages", "config", "seed"):
            self.assertEqual(record[key], json.loads(json.dumps(start[key])), key)
        self.assertEqual(record["wall_time_s"], 12.5)
        self.assertEqual(record["data"], {"train": {"slices": 7}})
        self.assertIn("jax", record["packages"])
        self.assertIn("commit", record["git"])


if __name__ == "__main__":
    absltest.main()
