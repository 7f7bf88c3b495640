"""Student-t quantiles for 95% intervals over seeds, shared by the experiments."""

from __future__ import annotations

T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    14: 2.145,
    16: 2.120,
    18: 2.101,
    20: 2.086,
    30: 2.042,
}  # fmt: skip  (Student t 0.975 quantiles)


def t975(df: int) -> float:
    if df <= 0:
        return float("nan")
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96  # conservative
