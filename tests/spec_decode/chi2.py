"""Chi-square goodness of fit without scipy (Wilson-Hilferty approximation of the quantile)."""
import math


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) at the normal quantile z (3.09: p = 0.001)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts, probs, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells with small expectations are pooled."""
    n = sum(counts)
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for c, p in zip(counts, probs):
        if p * n < min_expected:
            pool_o += c
            pool_e += p * n
        else:
            obs.append(c)
            exp.append(p * n)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    return stat, len(obs) - 1
