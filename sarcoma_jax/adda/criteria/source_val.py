"""`source_val`: the target map's primary metric (F1) on the labelled source val split; higher is
better (SPEC §10: source-domain validation, the usual baseline of validator benchmarks, e.g.
Musgrave et al., ECCV 2022). It needs source labels only."""

import dataclasses

from sarcoma_jax.adda.criteria.validator import Validator


@dataclasses.dataclass(frozen=True)
class SourceVal(Validator):
    name: str = "source_val"
    label: str = "source val"

    def measure(self, probe) -> dict[str, float]:
        scored = probe.task.evaluate(probe.source_val_outputs, probe.source_val)
        return {self.name: float(scored[probe.task.primary_metric])}
