"""Planning: every transform's decisions, chosen before the first token runs.

* `schedule`: the eviction arithmetic of one site (`SiteSchedule`), exact to the byte;
* `record`: the `Plan` (versioned on disk, validated against the model);
* `allocation`: spreading a global budget over the sites (`build_plan`), and a site's over its KV heads
  (`calibrated_head_shares`).

The verb `kvpass.plan(model, ...)` builds one from a model; this package never imports a
runtime, so the planner can run without transformers.
"""

from kvpass.planning.allocation import build_plan, calibrated_head_shares, curve_at, spread, uniform_plan
from kvpass.planning.record import ALLOCATIONS, FORMAT_VERSION, Plan
from kvpass.planning.schedule import SLOT_BYTES, STAT_BYTES, SiteSchedule, check_schedule_options, state_bytes_per_token

__all__ = ["Plan", "SiteSchedule", "build_plan", "calibrated_head_shares", "uniform_plan", "spread", "curve_at",
           "check_schedule_options", "state_bytes_per_token", "ALLOCATIONS", "FORMAT_VERSION", "SLOT_BYTES",
           "STAT_BYTES"]
