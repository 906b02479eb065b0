"""Peak memory of one `generate` call as a function of the prompt length, and the search over it.

For one batch size, number of new tokens and padding, `PeakCurve` gives each device's peak
(bytes above the weights) at a prompt of T tokens: the largest of
- the prefill of T tokens (and, for models with sliding windows or when only two tokens are
  generated, the first decoding step after it, when sliding layers still hold the whole prompt),
  simulated at each T asked for;
- the last decoding step, with T + new - 2 tokens cached. A decoding step's memory is affine in
  the cached tokens (the cache, one layer's copy while it grows, attention over it) past the
  lengths where fixed costs (the logits) dominate, so it is simulated as two lines (two
  consecutive steps give a slope), at the longest cache the search can ask for and at a short
  one, and checked by a simulation at the answer when it is what binds.

`largest_fitting` finds the longest prompt whose peak fits: interpolation between simulated
lengths (the peak is linear or quadratic in T: sdpa vs eager scores and masks), each guess
simulated, stopping when T fits and T + 1 does not. Simulations cost the same at any length
(fake tensors have no data), so the search counts simulations, not tokens.
"""

from __future__ import annotations

from typing import Callable

from llm_magic.predict.gen_compose import compose
from llm_magic.predict.gen_replica import Simulator

Peaks = dict  # device -> bytes above the weights


def _max_by_device(*peaks: Peaks) -> Peaks:
    merged: Peaks = {}
    for item in peaks:
        for device, nbytes in item.items():
            merged[device] = max(merged.get(device, 0), nbytes)
    return merged


class PeakCurve:
    """Per-device peak of a generate call at each prompt length, for one batch/new tokens/padding."""

    def __init__(self, simulator: Simulator, batch: int, new_tokens: int, padded: bool, longest_prompt: int) -> None:
        self.simulator = simulator
        self.layout = simulator.layout
        self.batch, self.new_tokens, self.padded = batch, new_tokens, padded
        self.longest_prompt = max(1, longest_prompt)  # the decode line is simulated for this one
        self.prefills: dict[int, Peaks] = {}  # T -> peaks of the prefill (and first step), simulated
        self._lines: list[tuple[int, Peaks, Peaks]] = []  # (C, peaks at C, peaks at C + 1)
        self.decodes: dict[int, Peaks] = {}  # cached tokens -> peaks of that decoding step, simulated

    def _compose(self, step) -> Peaks:
        return compose(self.layout, step, self.simulator.trace_index)

    def prefill(self, tokens: int) -> Peaks:
        if tokens not in self.prefills:
            first = self.new_tokens == 2 or (self.new_tokens > 2 and self.layout.sliding)
            steps = self.simulator.prefill(self.batch, tokens, self.padded, first_step=first)
            self.prefills[tokens] = _max_by_device(*(self._compose(step) for step in steps))
        return self.prefills[tokens]

    def decode(self, cached: int, *, simulate: bool = False) -> Peaks:
        """The decoding step with `cached` tokens in the cache: interpolated, or simulated.

        Two consecutive simulated steps at the longest cache the search can ask for and two at
        a short one (past the sliding windows): straight between them, each pair's slope beyond."""
        if simulate or cached in self.decodes:
            if cached not in self.decodes:
                self.decodes[cached] = self._compose(self.simulator.decode(self.batch, cached, self.padded)[0])
            return self.decodes[cached]
        if not self._lines:
            top = self.longest_prompt + self.new_tokens - 2
            short = min(top, 2 + max(self.layout.windows, default=0))
            for at in dict.fromkeys((top, short)):
                now, after = (self._compose(step) for step in self.simulator.decode(self.batch, at, self.padded))
                self._lines.append((at, now, after))
                self.decodes[at] = now
        return _on_lines(self._lines, cached)

    def peaks(self, tokens: int, *, simulate_decode: bool = False) -> Peaks:
        """Each device's peak for a prompt of `tokens` tokens (its prefill simulated)."""
        parts = [self.prefill(tokens)]
        if self.new_tokens >= 3:
            parts.append(self.decode(tokens + self.new_tokens - 2, simulate=simulate_decode))
        return _max_by_device(*parts)

    def estimate(self, tokens: int) -> Peaks:
        """Peaks between simulated lengths: quadratic through the three nearest (exact at each)."""
        if tokens in self.prefills or len(self.prefills) < 3:
            return self.peaks(tokens)
        nearest = sorted(self.prefills, key=lambda t: (abs(t - tokens), t))[:3]
        prefill = {device: max(0, round(_quadratic([(t, self.prefills[t].get(device, 0)) for t in nearest], tokens)))
                   for device in self.prefills[nearest[0]]}
        parts = [prefill] + ([self.decode(tokens + self.new_tokens - 2)] if self.new_tokens >= 3 else [])
        return _max_by_device(*parts)


def _on_lines(lines: list[tuple[int, Peaks, Peaks]], cached: int) -> Peaks:
    """Piecewise-linear through the simulated decoding steps (C, peaks at C, peaks at C + 1)."""
    points = sorted({at + offset: peaks for at, now, after in lines for offset, peaks in ((0, now), (1, after))}.items())
    if cached <= points[0][0] or len(points) == 1:
        (x0, y0), (x1, y1) = points[0], points[min(1, len(points) - 1)]
    elif cached >= points[-1][0]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
    else:
        (x0, y0), (x1, y1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= cached <= b[0])
    if x1 == x0:
        return dict(y0)
    return {device: round(y0[device] + (y1.get(device, 0) - y0[device]) * (cached - x0) / (x1 - x0)) for device in y0}


def _quadratic(points: list[tuple[float, float]], x: float) -> float:
    """Lagrange interpolation through two or three points."""
    total = 0.0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term *= (x - xj) / (xi - xj)
        total += term
    return total


def largest_fitting(excess: Callable[[int], int], low: int, high: int) -> int:
    """The largest T in [low, high] with excess(T) <= 0 (excess never decreases); low - 1 if none.

    Halves down from `high` until a length fits (the peak is dominated by the same terms near
    the answer, so the points stay informative), then interpolates inside the bracket."""
    known: dict[int, int] = {high: excess(high)}
    if known[high] <= 0:
        return high
    tokens = high
    while tokens > low:
        tokens = max(low, tokens // 2)
        known[tokens] = excess(tokens)
        if known[tokens] <= 0:
            break
    if known[tokens] > 0:
        return low - 1
    fits = tokens  # bracket: fits fits, fails does not
    fails = min(t for t in known if known[t] > 0)
    while fails - fits > 1:
        guess = _guess(known, fits, fails)
        known[guess] = excess(guess)
        if known[guess] <= 0:
            fits = guess
            if fails - fits > 1:  # the answer if the next length does not fit: check it now
                known[guess + 1] = excess(guess + 1)
                if known[guess + 1] > 0:
                    fails = guess + 1
                else:
                    fits = guess + 1
        else:
            fails = guess
    return fits


def _guess(known: dict[int, int], fits: int, fails: int) -> int:
    """Where excess crosses 0 by interpolation through the nearest known points, kept inside (fits, fails)."""
    nearest = sorted(known, key=lambda t: min(abs(t - fits), abs(t - fails)))[:3]
    points = [(t, known[t]) for t in sorted(nearest)]
    root = _root(points, fits, fails)
    span = fails - fits
    # Safeguard (as in Brent's method): a guess hugging one end halves the bracket instead.
    if root is None or not fits < root < fails:
        return (fits + fails) // 2
    guess = int(root)
    if span > 8 and (guess - fits < span / 64 and known[fits] < -known[fails] / 64):
        return (fits + fails) // 2
    return min(max(guess, fits + 1), fails - 1)


def _root(points: list[tuple[int, int]], low: int, high: int) -> float | None:
    """The x in (low, high) where the curve through `points` is 0 (bisection on the interpolant)."""
    a, b = float(low), float(high)
    fa, fb = _quadratic(points, a), _quadratic(points, b)
    if fa > 0 or fb <= 0:
        return None
    for _ in range(60):
        mid = (a + b) / 2
        if _quadratic(points, mid) <= 0:
            a = mid
        else:
            b = mid
    return a
