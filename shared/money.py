"""Money is integer fen (分). Helpers refuse anything that is not an int."""

from __future__ import annotations


def ensure_fen(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"money must be integer fen, got {type(value).__name__}")
    return value


def format_yuan(fen: int) -> str:
    """Display only: 1234 → '¥12.34'."""
    ensure_fen(fen)
    sign = "-" if fen < 0 else ""
    yuan, rest = divmod(abs(fen), 100)
    return f"{sign}¥{yuan}.{rest:02d}"


def commission(amount_fen: int, bps: int) -> int:
    """Commission in basis points, rounded half up to the fen (in the platform's favour)."""
    ensure_fen(amount_fen)
    return (amount_fen * bps + 5_000) // 10_000
