"""The reference implementation (patchnetvlad==0.1.8) as a test oracle: the calls of benchmarks/reference.py,
one copy for the benchmarks and the tests (pyproject's pytest ``pythonpath`` puts the repository root on the path).
"""

from benchmarks.reference import (
    reference_extract,
    reference_fused,
    reference_matcher,
    reference_model,
    reference_order,
    reference_raw_scores,
)

__all__ = [
    "reference_extract",
    "reference_fused",
    "reference_matcher",
    "reference_model",
    "reference_order",
    "reference_raw_scores",
]
