"""Named profiles: a set of run-config values a user picks with one key (``profile = "accurate"``).

The app's defaults are the lean point (at least fixed-rank LoRA's accuracy at under half its bytes). A profile
trades bytes for accuracy; its measured cost and accuracy are in the README, and ``safedlora compare`` runs it
as the method of the same name (``compare.plan.METHODS``).
"""

from __future__ import annotations

from typing import Any

#: Every Linear layer of a BERT-style encoder (MiniLM): attention query/key/value, and ``dense`` for the
#: attention output, both feed-forward layers and the pooler.
ALL_LINEAR = "query,key,value,dense"

#: profile -> run-config values it sets.
PROFILES: dict[str, dict[str, Any]] = {
    # LoRA on every Linear layer (37 modules on MiniLM instead of 12), rank 16 annealed to 8.
    "accurate": {"target-modules": ALL_LINEAR, "rank-max": 16, "rank-min": 8},
}
