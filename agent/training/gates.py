"""What a trained model must show on held-out photos before ``models train`` offers it.

Three checks on the test split, both files run as the agent runs them: the int8 file agrees
with the fp32 one on at least ``MIN_AGREEMENT`` of the photos, loses at most
``MAX_INT8_LOSS`` of top-1 against it, and (when the user set one) the int8 file reaches
the minimum top-1. A model that fails any is written and reported, but no deploy line is
offered and ``models train`` exits non-zero unless ``--force``. Without a test split
nothing can be checked, and that is a failed gate too. Where only int8 failed, the report
says that the fp32 file met the rest (``fp32_instead``); publishing it is the user's call.

Where the agreement gate fails and the fp32 file's own answers are not firm (it keeps fewer
than ``MIN_AGREEMENT`` of them when +-1 grey level of noise is added to each photo), the
refusal says so: no int8 file can be expected to keep answers that the fp32 one itself
changes between two shots of a scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_AGREEMENT = 0.98
MAX_INT8_LOSS = 0.01


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    says: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "passed": self.passed,
            "says": self.says,
        }


def _fragile(firmness: float | None) -> str:
    if firmness is None or firmness >= MIN_AGREEMENT:
        return ""
    return (
        f"; the fp32 file itself keeps only {firmness:.1%} of its answers with +-1 grey level "
        "of noise on each photo: answers that move under so little are not ones an int8 file "
        "can be expected to keep (more photos per class, or classes that differ more, make "
        "them firmer)"
    )


def judge(test: dict[str, Any] | None, min_accuracy: float | None) -> dict[str, Any]:
    """``{"passed": bool, "checks": [...], "refused": [reason, ...]}`` for a report's
    ``test`` section (None: no test split)."""
    if not test or not test["int8"]["images"]:
        reason = "no held-out test photos (--test-split 0?): the gates cannot be checked"
        return {"passed": False, "checks": [], "refused": [reason]}
    fp32, int8 = test["fp32"]["accuracy"], test["int8"]["accuracy"]
    agreement = test["int8_agreement"]
    checks = [
        Check(
            "int8_agreement",
            agreement,
            MIN_AGREEMENT,
            agreement >= MIN_AGREEMENT,
            f"int8 agrees with fp32 on {agreement:.1%} of the test photos "
            f"(at least {MIN_AGREEMENT:.0%} needed){_fragile(test.get('fp32_noise_agreement'))}",
        ),
        Check(
            "int8_loss",
            fp32 - int8,
            MAX_INT8_LOSS,
            fp32 - int8 <= MAX_INT8_LOSS + 1e-9,
            f"int8 top-1 {int8:.1%} against fp32 {fp32:.1%} "
            f"(at most {MAX_INT8_LOSS * 100:.0f} point lower allowed)",
        ),
    ]
    if min_accuracy is not None:
        checks.append(
            Check(
                "min_accuracy",
                int8,
                min_accuracy,
                int8 >= min_accuracy,
                f"int8 top-1 {int8:.1%} (--min-accuracy {min_accuracy:.1%})",
            )
        )
    passed = all(c.passed for c in checks)
    return {
        "passed": passed,
        "checks": [c.as_dict() for c in checks],
        "refused": [c.says for c in checks if not c.passed],
        # The fp32 file is the model the int8 one is judged against: where int8 is what
        # failed, it is the one to consider (CPU and GPU delegates; an EdgeTPU needs int8).
        "fp32_instead": not passed and (min_accuracy is None or fp32 >= min_accuracy),
    }
