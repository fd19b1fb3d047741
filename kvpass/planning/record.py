"""The Plan: every transform's decisions for one model, chosen before the first token runs.

A plan holds, per attention site, the eviction fraction of its cache, the KV heads head
pruning removed, and the evidence behind them (calibration entropy, predicted retention and
output error, head importance). Byte figures are always relative to the *unmodified* model:
`full_kv_bytes` counts every original head, `kv_bytes` what the pruned model holds.

Plans are saved as versioned JSON and validated when loaded (types and ranges, naming the
file) and when applied (`check_model`: site names, geometry and dtype must be the model's),
so a hand-edited or foreign plan fails loudly instead of running unpruned.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import sympy

from kvpass.cost import BATCH, SEQ, SiteCost, Symbols, site_cost, smin
from kvpass.methods import Method, Stat, get_method
from kvpass.errors import UnsupportedModelError
from kvpass.planning.head_schedule import SHARE_UNIT, HeadSchedule
from kvpass.planning.schedule import (STAT_BYTES, SiteSchedule, WindowShare, check_schedule_options,
                                      state_bytes_per_token)
from kvpass.site import AttentionSite
from kvpass.validation import integer, real

FORMAT_VERSION = 3
"""Version 1 (no `format` key) had no head pruning and no transforms list; version 2 called the
method option `shared_keep_set` `per_head` (its inverse) and had no per-head budgets or streaming
heads. Both still load."""
ALLOCATIONS = ("uniform", "pyramid", "adaptive")


@dataclass
class Plan:
    """Budgets per attention site, the transforms that realise them, and the evidence behind them.

    Example:
        >>> from kvpass.planning import build_plan
        >>> site = AttentionSite("layers.0.attn", 0, 4, 2, 16, None, True)
        >>> plan = build_plan([site], 0.5, get_method("h2o"))
        >>> plan.budgets, plan.kv_bytes(1000) <= 0.5 * plan.full_kv_bytes(1000)
        ({'layers.0.attn': 0.5}, True)
    """

    method: Method | None
    """The eviction method (None when no `Evict` transform runs: caches are never evicted)."""
    budgets: dict[str, float]
    """Site name -> fraction of its cache's bytes kept by eviction, relative to the site's cache
    after structural transforms (one fraction per site: every KV head keeps as many tokens)."""
    sinks: int = 4
    recent: int = 32
    evict_every: int = 1
    allocation: str = "uniform"
    max_tokens: dict[str, int] = field(default_factory=dict)
    """Site name -> absolute token cap (token and byte budgets); the site holds at most the
    smaller of this and its fraction's cap."""
    sites: list[AttentionSite] = field(default_factory=list)
    """Geometry of every site in the unmodified model, for byte and cost accounting."""
    dtype_bytes: int = 4
    """Element size of the cache the byte figures assume (the model's parameter dtype)."""
    requested: str = ""
    """The budget as written (`0.5`, `'2048 tokens'`, `'1.5GiB'`)."""
    entropy: dict[str, list[float]] = field(default_factory=dict)
    """Site name -> normalised attention entropy per KV head, from calibration."""
    retention: dict[str, float] = field(default_factory=dict)
    """Site name -> predicted share of the last-window attention mass the kept tokens hold."""
    output_error: dict[str, float] = field(default_factory=dict)
    """Site name -> predicted relative error of the attention output at its budget."""
    floor: float = 0.0
    ceiling: float = 1.0
    """Bounds every site's fraction stays within, at plan time and when re-allocating."""
    reallocate: int = 0
    """Re-spread the budget between sites every this many decoded tokens (0: fixed shares);
    see `kvpass.runtime.reallocation`."""
    pruned_heads: dict[str, list[int]] = field(default_factory=dict)
    """Site name -> indices of the original KV heads removed (with their query groups)."""
    head_importance: dict[str, list[float]] = field(default_factory=dict)
    """Site name -> the score that ranked each original KV head for removal (higher: kept first)."""
    transforms: list[dict[str, Any]] = field(default_factory=list)
    """The transforms that made the plan, as `{"name": ..., "options": {...}}`, in the order given."""
    per_head_budgets: bool = False
    """Each KV head of a site keeps its own number of tokens: the site's budget goes to the best-scored
    tokens of any of its heads in one joint top-k (AdaKV), each head keeping `head_floor` of an equal share."""
    head_floor: float = 0.2
    head_shares: dict[str, list[int]] = field(default_factory=dict)
    """Site name -> with per-head budgets, each budgeted KV head's fixed part of an equal share in
    1/64ths (`HeadSchedule.shares`; kept heads that do not stream, in order), chosen at compile time
    from calibration (`Evict(per_head=True, head_allocation="calibrated")`). A site absent here
    splits its budget by the joint top-k."""
    streaming_heads: dict[str, list[int]] = field(default_factory=dict)
    """Site name -> original KV heads that keep only `streaming_sinks` + `streaming_recent` tokens (DuoAttention)."""
    streaming_sinks: int = 4
    streaming_recent: int = 64
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    """Site name -> bytes per sequence a transform holds beside the cache (token filtering's
    anchors), carved out of the site's cap."""

    # ----------------------------------------------------------------- geometry and schedules

    def geometry(self, site: AttentionSite) -> AttentionSite:
        """`site` as the pruned model has it: minus the KV heads (and their query groups) removed."""
        removed = len(self.pruned_heads.get(site.name, ()))
        if not removed:
            return site
        return replace(site, num_heads=site.num_heads - removed * site.group_size,
                       num_kv_heads=site.num_kv_heads - removed)

    def schedule(self, site: AttentionSite, dtype_bytes: int) -> SiteSchedule:
        """The eviction arithmetic for `site` (original geometry; pruned heads are taken off here)
        with a cache stored in `dtype_bytes`-wide elements."""
        fraction, max_tokens = self.budgets[site.name], self.max_tokens.get(site.name)
        pruned = self.geometry(site)
        prunes = fraction < 1.0 or max_tokens is not None
        state, stat = state_bytes_per_token(pruned, self.method) if prunes else (0, 0)
        return SiteSchedule(
            fraction=fraction,
            kv_bytes_per_token=pruned.kv_bytes_per_token(dtype_bytes),
            state_bytes_per_token=state,
            sinks=self.sinks if site.window is None else 0,  # a window moves past the first tokens
            recent=self.recent,
            evict_every=self.evict_every,
            max_tokens=max_tokens,
            stat_bytes_per_token=stat,
            page_size=self.method.page_size if self.method is not None else 1,
            reserved_bytes=self.reserved_bytes.get(site.name, 0),
            window=site.window,
            shared=self._window_share(dtype_bytes),
        )

    def head_schedule(self, site: AttentionSite, dtype_bytes: int) -> HeadSchedule | None:
        """The arithmetic of `site`'s ragged cache, or None when every KV head keeps as many tokens."""
        schedule = self.schedule(site, dtype_bytes)
        removed = set(self.pruned_heads.get(site.name, ()))
        kept = [head for head in range(site.num_kv_heads) if head not in removed]
        streaming = tuple(kept.index(head) for head in self.streaming_heads.get(site.name, ()))
        if not streaming and not (self.per_head_budgets and schedule.prunes):
            return None
        unsupported = ([f"logit ops {site.logit_ops}"] if site.logit_ops else []) + (
            ["a sliding window or chunks"] if site.window is not None else []) + (
            ["a budget shared with windowed sites"] if schedule.shared is not None else []) + (
            ["KV heads repeated whole (tiled)"] if site.kv_tiled else [])
        if unsupported:
            asked = "per-head budgets (Evict(per_head=True))" if self.per_head_budgets else "streaming heads"
            raise UnsupportedModelError(
                f"{asked} are not supported at {site.name}, whose attention has {' and '.join(unsupported)}: the "
                "ragged cache applies causal + padding masks only; use Evict without per_head or StreamingHeads")
        pruned = self.geometry(site)
        stat = STAT_BYTES if schedule.stat_bytes_per_token else 0
        return HeadSchedule(schedule, pruned.num_kv_heads, pruned.kv_bytes_per_token(dtype_bytes) // pruned.num_kv_heads,
                            stat, streaming, self.streaming_sinks, self.streaming_recent, self.per_head_budgets,
                            self.head_floor, tuple(self.head_shares.get(site.name, ())))

    def cache_schedule(self, site: AttentionSite, dtype_bytes: int) -> SiteSchedule | HeadSchedule:
        """What bounds `site`'s cache: its ragged arithmetic when its heads differ, else the uniform one."""
        return self.head_schedule(site, dtype_bytes) or self.schedule(site, dtype_bytes)

    def _window_share(self, dtype_bytes: int) -> WindowShare | None:
        """How a hybrid model's full-attention sites pay for keeping its windowed sites whole
        (`kvpass.planning.schedule.WindowShare`); None unless both kinds of site evict."""
        windowed = [site for site in self.sites if site.window is not None and self.budgets[site.name] < 1.0]
        full = [site for site in self.sites if site.window is None and self.budgets[site.name] < 1.0]
        if not windowed or not full or self.max_tokens:
            return None

        def cost(site):
            kv = self.geometry(site).kv_bytes_per_token(dtype_bytes)
            return Fraction(self.budgets[site.name]) * kv, kv + state_bytes_per_token(self.geometry(site), self.method)[0]

        return WindowShare(full_bytes=sum(cost(site)[0] for site in full),
                           windows=tuple((site.window, cost(site)[1] - cost(site)[0]) for site in windowed))

    def _geometry(self) -> list[AttentionSite]:
        if not self.sites:
            raise ValueError("this plan carries no site geometry: make it with kvpass.plan() or build_plan(sites, ...)")
        return self.sites

    # ----------------------------------------------------------------- bytes and costs

    def kv_bytes(self, seq_len: int, batch: int = 1) -> int:
        """Bytes the pruned cache holds after a prefill of `seq_len` tokens per sequence,
        exactly as `kvpass.cache_bytes` counts them (no padding), at most: a selection transform may
        leave fewer tokens than the cap. Never above the budget (at budget 1, which caps nothing,
        the reserved bytes of token filtering come on top of the tokens).

        Example:
            >>> plan.kv_bytes(4096)      # doctest: +SKIP
            47185920
        """
        seq_len, batch = _lengths(seq_len, batch)
        return int(sum(self.cache_schedule(site, self.dtype_bytes).held_bytes(seq_len, batch)
                       for site in self._geometry()))

    def full_kv_bytes(self, seq_len: int, batch: int = 1) -> int:
        """Bytes the unmodified model's cache holds after `seq_len` tokens per sequence."""
        seq_len, batch = _lengths(seq_len, batch)
        return batch * sum(site.kv_bytes_per_token(self.dtype_bytes) * _held(site, seq_len) for site in self._geometry())

    @property
    def kv_bytes_expr(self) -> sympy.Expr:
        """`kv_bytes` as a sympy expression in `kvpass.cost.SEQ` and `BATCH`."""
        return sum((cost.kv_bytes for cost in self.costs().values()), sympy.Integer(0))

    @property
    def full_kv_bytes_expr(self) -> sympy.Expr:
        """`full_kv_bytes` as a sympy expression in `kvpass.cost.SEQ` and `BATCH`."""
        return sympy.expand(BATCH * sum(site.kv_bytes_per_token(self.dtype_bytes) * _held(site, SEQ)
                                        for site in self._geometry()))

    def costs(self, symbols: Symbols = Symbols()) -> dict[str, SiteCost]:
        """Site name -> its symbolic costs under this plan (KV bytes, prefill FLOPs, decode bytes),
        with the pruned model's geometry."""
        stat = self.method.stat if self.method is not None else Stat.NONE
        window = self.method.window if self.method is not None else 0
        scored = {Stat.NONE: 0, Stat.LAST_QUERY: 1, Stat.WINDOW: smin(window, symbols.seq),
                  Stat.COLUMN_SUM: symbols.seq}[stat]
        return {
            site.name: site_cost(self.geometry(site), self.dtype_bytes, symbols, self.cache_schedule(site, self.dtype_bytes),
                                 scored)
            for site in self._geometry()
        }

    def within(self, budget_fraction: float) -> bool:
        """Whether the plan's byte cap is within `budget_fraction` of the unmodified cache at every
        length: the sites' eviction fractions, weighted by their pruned bytes per token, against
        the original bytes per token (exact arithmetic)."""
        spent = sum(Fraction(self.budgets[site.name]) * self.geometry(site).kv_bytes_per_token(self.dtype_bytes)
                    for site in self._geometry())
        return spent <= Fraction(budget_fraction) * sum(site.kv_bytes_per_token(self.dtype_bytes)
                                                        for site in self._geometry())

    # ----------------------------------------------------------------- for people

    def table(self, seq_len: int = 4096) -> str:
        """A markdown table for people: per site its KV heads kept, entropy, budget, predicted
        retained mass and output error, and bytes.

        Example:
            >>> print(plan.table(4096))   # doctest: +SKIP
        """
        header, *rows = self.table_rows(seq_len)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    def table_rows(self, seq_len: int = 4096) -> list[list[str]]:
        """`table`'s cells: the header, a row per site, and the total row (for other renderings)."""
        rows = [["layer", "site", "KV heads", "entropy", "budget", "retained", "output error", f"KiB @ {seq_len}"]]
        for site in self._geometry():
            entropy = self.entropy.get(site.name)
            cap = self.max_tokens.get(site.name)
            retained, error = self.retention.get(site.name), self.output_error.get(site.name)
            rows.append([
                str(site.layer), site.name, f"{self.geometry(site).num_kv_heads}/{site.num_kv_heads}",
                f"{sum(entropy) / len(entropy):.3f}" if entropy else "-",
                f"{self.budgets[site.name]:.3f}" + (f" / {cap} tok" if cap is not None else ""),
                f"{retained:.3f}" if retained is not None else "-",
                f"{error:.3f}" if error is not None else "-",
                f"{self.cache_schedule(site, self.dtype_bytes).held_bytes(seq_len) / 1024:.1f}",
            ])
        full, pruned = self.full_kv_bytes(seq_len), self.kv_bytes(seq_len)
        method = self.method.name if self.method is not None else "no eviction"
        rows.append(["all", f"{self.allocation}, {method}, budget {self.requested or '?'}", "", "", f"{pruned / full:.3f}",
                     "", "", f"{pruned / 1024:.1f} of {full / 1024:.1f}"])
        return rows

    # ----------------------------------------------------------------- validation

    def validate(self, where: str = "plan") -> None:
        """Raise ValueError, naming `where` and the field, unless every value has its type and range."""
        def fail(what: str) -> None:
            raise ValueError(f"{where}: {what}")

        if self.method is not None and not isinstance(self.method, Method):
            fail(f"method must be a kvpass Method or None, got {self.method!r}")
        try:
            check_schedule_options(self.sinks, self.recent, self.evict_every)
            integer(self.reallocate, "reallocate", minimum=0)
            floor, ceiling = real(self.floor, "floor", 0.0, 1.0), real(self.ceiling, "ceiling", 0.0, 1.0)
        except ValueError as error:
            fail(str(error))
        if self.allocation not in ALLOCATIONS:
            fail(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.dtype_bytes not in (1, 2, 4, 8):
            fail(f"dtype_bytes must be 1, 2, 4 or 8, got {self.dtype_bytes!r}")
        if floor > ceiling:
            fail(f"floor {floor} is above ceiling {ceiling}")
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            fail("sites has duplicate names")
        if set(self.budgets) != set(names):
            fail(f"budgets must name exactly the plan's sites; missing {sorted(set(names) - set(self.budgets))}, "
                 f"unknown {sorted(set(self.budgets) - set(names))}")
        for name, fraction in self.budgets.items():
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
                    or not 0.0 < fraction <= 1.0:
                fail(f"budgets[{name!r}] must be a fraction in (0, 1], got {fraction!r}")
            if fraction < 1.0 and self.method is None:
                fail(f"budgets[{name!r}] = {fraction} evicts, but the plan has no eviction method")
        for name, reserved in self.reserved_bytes.items():
            if name not in names or isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0:
                fail(f"reserved_bytes[{name!r}] must be a byte count >= 0 for a site of the plan, got {reserved!r}")
        for name, cap in self.max_tokens.items():
            if name not in names or isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                fail(f"max_tokens[{name!r}] must be a token count >= 0 for a site of the plan, got {cap!r}")
        sites = {site.name: site for site in self.sites}
        for name, heads in self.pruned_heads.items():
            site = sites.get(name)
            if site is None:
                fail(f"pruned_heads names {name!r}, which is not a site of the plan")
            if not isinstance(heads, list) or len(set(heads)) != len(heads) or any(
                    isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < site.num_kv_heads for h in heads):
                fail(f"pruned_heads[{name!r}] must list distinct KV head indices in [0, {site.num_kv_heads}), "
                     f"got {heads!r}")
            if len(heads) >= site.num_kv_heads:
                fail(f"pruned_heads[{name!r}] removes all {site.num_kv_heads} KV heads; every site keeps one")
        for name, heads in self.streaming_heads.items():
            site = sites.get(name)
            if site is None:
                fail(f"streaming_heads names {name!r}, which is not a site of the plan")
            removed = set(self.pruned_heads.get(name, ()))
            if not isinstance(heads, list) or len(set(heads)) != len(heads) or any(
                    isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < site.num_kv_heads or h in removed
                    for h in heads):
                fail(f"streaming_heads[{name!r}] must list distinct KV head indices in [0, {site.num_kv_heads}) "
                     f"that pruned_heads does not remove, got {heads!r}")
        if not isinstance(self.per_head_budgets, bool):
            fail(f"per_head_budgets must be true or false, got {self.per_head_budgets!r}")
        if isinstance(self.head_floor, bool) or not isinstance(self.head_floor, (int, float)) \
                or not 0.0 <= self.head_floor <= 1.0:
            fail(f"head_floor must be a fraction in [0, 1], got {self.head_floor!r}")
        for name, shares in self.head_shares.items():
            site = sites.get(name)
            if site is None:
                fail(f"head_shares names {name!r}, which is not a site of the plan")
            removed = set(self.pruned_heads.get(name, ())) | set(self.streaming_heads.get(name, ()))
            budgeted = site.num_kv_heads - len(removed)
            if not self.per_head_budgets or not isinstance(shares, list) or len(shares) != budgeted or any(
                    isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shares) \
                    or sum(shares) > SHARE_UNIT * budgeted:
                fail(f"head_shares[{name!r}] must give each of the site's {budgeted} budgeted KV heads a part >= 0 "
                     f"(in 1/{SHARE_UNIT}ths, summing to at most {SHARE_UNIT * budgeted}) of a plan with "
                     f"per_head_budgets, got {shares!r}")
        try:
            check_schedule_options(self.streaming_sinks, self.streaming_recent, 1)
        except ValueError as error:
            fail(f"streaming {error}")

    def check_model(self, sites: list[AttentionSite], dtype_bytes: int) -> None:
        """Raise ValueError unless this plan was made for a model with exactly these `sites` (names
        and geometry) and this cache element size; a plan for another model never runs."""
        self.validate()
        mine = {site.name: site for site in self.sites}
        theirs = {site.name: site for site in sites}
        if set(mine) != set(theirs):
            raise ValueError(
                f"plan was made for another model: its sites {sorted(set(mine) - set(theirs))[:4]} are not in this "
                f"model, and this model's sites {sorted(set(theirs) - set(mine))[:4]} are not in the plan")
        for name, site in theirs.items():
            planned = mine[name]
            shape = lambda s: (s.num_heads, s.num_kv_heads, s.head_dim)  # noqa: E731
            if shape(planned) != shape(site):
                raise ValueError(f"plan was made for another model: site {name} has (heads, KV heads, head dim) "
                                 f"{shape(site)} here but {shape(planned)} in the plan")
        if dtype_bytes != self.dtype_bytes:
            raise ValueError(f"plan was made for {self.dtype_bytes}-byte elements but the model's cache uses "
                             f"{dtype_bytes}-byte elements: make the plan for this dtype")

    # ----------------------------------------------------------------- on disk

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (`save` writes it)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("method", "sites")}
        return {
            "format": FORMAT_VERSION,
            "method": None if self.method is None else {"name": self.method.name, "options": asdict(self.method)},
            "sites": [site.to_dict() for site in self.sites],
            **data,
        }

    def save(self, path: str | Path) -> None:
        """Write the plan as versioned JSON (transforms, budgets, removed heads, sites, evidence).

        Sites are saved without their graph match (it points into one captured graph); `optimize`
        re-finds the sites and checks they are the plan's."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        """A validated plan from `to_dict` data; errors name `where` and the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format", 1)
        if version not in (1, 2, FORMAT_VERSION):
            raise ValueError(f"{where}: plan format {version!r} is not supported (this kvpass reads 1 to "
                             f"{FORMAT_VERSION})")
        if version < 3:
            data = _renamed_method_option(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown plan fields {sorted(unknown)}")
        try:
            method = data.pop("method", None)
            if method is not None:
                method = get_method(method["name"], **method["options"])
            sites = [AttentionSite.from_dict(site) for site in data.pop("sites", [])]
            plan = cls(method=method, sites=sites, **data)
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"{where}: not a valid kvpass plan ({type(error).__name__}: {error})") from error
        plan.validate(where)
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read and validate a plan written by `save`; every error names the file.

        Example:
            >>> plan.save("plan.json"); kvpass.optimize(model, plan=Plan.load("plan.json"))  # doctest: +SKIP
        """
        where = str(path)
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as error:
            raise FileNotFoundError(f"plan file {where!r} does not exist") from error
        except OSError as error:  # a directory, no permission, ...
            raise ValueError(f"{where}: cannot read the plan file ({error.strerror or error})") from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{where}: not a JSON plan file ({error})") from error
        return cls.from_dict(data, where)


def _renamed_method_option(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1-2 plan with the method option `per_head` spelled as today's `shared_keep_set`."""
    def method(record: Any) -> Any:
        if isinstance(record, dict) and isinstance(record.get("options"), dict) and "per_head" in record["options"]:
            options = dict(record["options"])
            options["shared_keep_set"] = not options.pop("per_head")
            return {**record, "options": options}
        return record

    transforms = [
        {**t, "options": {**t["options"], "method": method(t["options"].get("method"))}}
        if isinstance(t, dict) and isinstance(t.get("options"), dict) and "method" in t["options"] else t
        for t in data.get("transforms", [])]
    return {**data, "method": method(data.get("method")), "transforms": transforms}


def _lengths(seq_len: Any, batch: Any) -> tuple[int, int]:
    """Both as plain ints (numpy ints too: exact arithmetic must not overflow int64), or a ValueError."""
    return integer(seq_len, "seq_len", minimum=0), integer(batch, "batch", minimum=0)


def _held(site: AttentionSite, seq_len):
    """Tokens the unmodified site holds after `seq_len` (a windowed site: at most its window)."""
    return seq_len if site.window is None else smin(seq_len, site.window)
