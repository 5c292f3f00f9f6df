"""Fuzzing the ingest: seeded, bounded mutations of a real sts_ibsi patient, the invariant of
issue 17 asserted after each (tests/malformed_cases.py; benchmarks/fuzz.py runs the same at scale).

hypothesis draws the mutation kind and its seed; derandomize=True makes the drawn examples the
same on every run, so a failure replays, and the example count keeps the file near a minute on
the 2-core CI machine.
"""

import os
import random
import shutil
import tempfile

import hypothesis
import malformed_cases as cases  # tests/
from absl.testing import absltest
from hypothesis import strategies as st

_EXAMPLES_PER_KIND = 6


@absltest.skipUnless(cases.STS_IBSI.is_dir(), "shared IBSI data not found")
class FuzzTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        alone = cases.build_case(os.path.join(cls.tmp, "alone"), (cases.GOOD,))
        outcome = cases.run_ingest(alone, os.path.join(cls.tmp, "alone_index"))
        assert outcome.error is None, outcome.error
        cls.good = cases.series_contents(outcome.index_dir, cases.GOOD)
        cls.bad = {}
        for series in ("PET", "MR_T1"):
            case = cases.build_case(os.path.join(cls.tmp, series), (cases.GOOD, series))
            outcome = cases.run_ingest(case, os.path.join(cls.tmp, f"{series}_index"))
            modality = cases.FOLDER_MODALITY[series]
            cls.bad[series] = (
                modality,
                len(cases.series_contents(outcome.index_dir, modality)["slices"]),
                len(cases.source_files(cases.GOOD, "image"))
                + len(cases.source_files(series, "image")),
            )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def check(self, kind: str, seed: int) -> None:
        series = cases.BAD_SERIES.get(kind, "PET")
        modality, slices, images = self.bad[series]
        with tempfile.TemporaryDirectory() as tmp:
            case = cases.build_case(os.path.join(tmp, "case"), (cases.GOOD, series))
            mutated = cases.MUTATIONS[kind](case, series, random.Random(seed))
            outcome = cases.run_ingest(case, os.path.join(tmp, "index"), timeout_s=60.0)
            violations = cases.invariant_violations(
                outcome, self.good, modality, slices, images, mutated, case
            )
        self.assertEqual(violations, [], f"{kind} seed {seed}: {mutated}")

    @hypothesis.settings(
        max_examples=_EXAMPLES_PER_KIND * len(cases.MUTATIONS),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(kind=st.sampled_from(sorted(cases.MUTATIONS)), seed=st.integers(0, 2**32 - 1))
    def test_invariant_holds(self, kind, seed):
        self.check(kind, seed)

    def test_every_kind_of_mutation(self):
        # hypothesis may favour some kinds: each kind at least twice, with fixed seeds.
        for kind in cases.MUTATIONS:
            for seed in (0, 1):
                self.check(kind, seed)


if __name__ == "__main__":
    absltest.main()
