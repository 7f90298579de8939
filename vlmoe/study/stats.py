"""The study's statistics: mean and spread over seeds, Welch's two-sided t-test against Dense (a
difference is called one only when p < 0.05). Written out (a regularised incomplete beta for the t
distribution) so the study needs no SciPy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["aggregate", "welch_t_test"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's two-sample t-test (unequal variances), two-sided: ``{"t", "df", "p"}``. Fewer than two
    values on a side, or no spread at all, gives ``p = nan`` (not testable)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan")}
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 == 0:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan") if ma == mb else 0.0}
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    p = _betainc(df / 2, 0.5, df / (df + t * t))  # P(|T| >= |t|) for Student's t with df degrees of freedom
    return {"t": t, "df": df, "p": p}


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if not n:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0


def aggregate(results: Sequence[dict[str, Any]], reference: str = "dense", alpha: float = 0.05) -> dict[str, Any]:
    """Per task, metric and variant the values over seeds, their mean and sample standard deviation, and
    for every other variant Welch's test against ``reference`` on the same metric."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        for k, v in r["metrics"].items():
            if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
                table.setdefault(r["task"], {}).setdefault(k, {}).setdefault(r["variant"], []).append(float(v))
    out: dict[str, Any] = {}
    for task, metrics in table.items():
        out[task] = {}
        for metric, by_variant in metrics.items():
            rows = {}
            for variant, xs in by_variant.items():
                m, s = _mean_std(xs)
                rows[variant] = {"values": xs, "mean": m, "std": s, "n": len(xs)}
            ref = by_variant.get(reference)
            for variant, row in rows.items():
                if ref is None or variant == reference:
                    continue
                test = welch_t_test(by_variant[variant], ref)
                resolved = not math.isnan(test["p"]) and test["p"] < alpha
                row["vs_reference"] = {**test, "difference": row["mean"] - rows[reference]["mean"],
                                       "resolved": resolved}
            out[task][metric] = rows
    return out


# ---------------------------------------------------------------------------------------------- report
