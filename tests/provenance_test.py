"""Tests for the run records: collect at the start, add at the end."""

import json
import pathlib
import tempfile
from unittest import mock

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

    def test_the_commit_is_the_one_the_process_started_from(self):
        # A process that runs several folds or seeds in turn records, for each, the commit it
        # imported its code from, even if a commit lands while it runs.
        provenance._git_state_at_first_call.cache_clear()
        self.addCleanup(provenance._git_state_at_first_call.cache_clear)
        heads = iter(["a" * 40, "", "b" * 40, ""])
        with mock.patch.object(provenance, "_git", side_effect=lambda *args: next(heads)):
            first = provenance.collect({}, 0)["git"]
            second = provenance.collect({}, 1)["git"]
        self.assertEqual(first, {"commit": "a" * 40, "dirty": False})
        self.assertEqual(second, first)


if __name__ == "__main__":
    absltest.main()
