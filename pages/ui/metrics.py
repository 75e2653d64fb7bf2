"""How a before → after figure is shown in an ``st.metric``."""

from __future__ import annotations


def change_delta(before: float, after: float) -> tuple[str, str]:
    """The metric's delta text and colour: the change to three decimals, grey when it rounds to zero
    (so a change of −0.0004 reads "+0.000" in grey, not a red "-0.000")."""
    change = round(after - before, 3) + 0.0  # + 0.0 turns −0.0 into 0.0
    return f"{change:+.3f} (before {before:.3f})", "normal" if change else "off"
