"""Per-stream ring buffer that cuts chunks into overlapping windows.

Decisions (DESIGN.md section 2):

- The sample clock is the reference. After a (re)start the stream is anchored at the first
  chunk's timestamp; window *i* starts at ``anchor + i * hop / fs``, computed with exact
  integer arithmetic. Later chunk timestamps are only checked, not used, so clock jitter on
  the sensor side does not jitter window times.
- A chunk continues the stream when its ``seq`` is the previous one + 1 and its timestamp is
  within ``max(max_time_jitter_s, 1 / fs)`` of the time implied by the samples so far.
  Otherwise:

  * ``seq <= last seq`` with the same content (:attr:`Chunk.digest`: timestamp, seq, rate and
    samples) as the chunk accepted with that seq: a **duplicate** (MQTT QoS 1 redelivers at
    least once). It is dropped and counted, so every chunk is windowed exactly once. The
    digests of the last :data:`SEEN_SEQS` chunks are kept.
  * ``seq <= last seq`` with other content: the publisher **restarted** (its seq counter began
    again, whatever its clock says); the stream restarts at the new chunk. Whether its windows
    may be emitted (a clock that went backwards) is decided by the ingestion stage, which keeps
    the newest window start of every stream (:mod:`pdm_edge.ingest.service`).
  * a ``seq`` jump, or a timestamp jump: a **gap**; the partial window is discarded and the
    stream restarts at the new chunk. Snapshot sensors (FEMTO: 0.1 s every 10 s) therefore
    give one or more whole windows per snapshot and never a window that spans a gap.
  * a different sample rate (only possible for streams accepted without configuration): a
    **rate change**; the stream restarts.

- Memory is bounded: the buffer holds at most one window plus one chunk of samples.
"""

from __future__ import annotations

import collections
import dataclasses
from fractions import Fraction

import numpy as np

from pdm_edge.ingest.chunk import Chunk
from pdm_edge.types import SensorKind, Window

EVENTS = ("duplicate", "gap_seq", "gap_time", "restart", "rate_change", "time_backwards")
"""Stream events, counted per stream. ``time_backwards`` is counted by the ingestion stage
(a chunk whose windows would start at or before windows already emitted)."""

SEEN_SEQS = 256
"""How many recent (seq, digest) pairs a stream remembers to recognise QoS 1 redeliveries."""


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """How one stream is windowed.

    Attributes:
        kind: ``"vibration"`` or ``"acoustic"``.
        sample_rate_hz: Hz.
        unit: unit of the samples handed on.
        window_samples: samples per window (``window_s * sample_rate_hz``).
        hop_samples: samples between window starts (``hop_s * sample_rate_hz``).
        max_time_jitter_s: timestamp tolerance before a jump counts as a gap, s.
    """

    kind: SensorKind
    sample_rate_hz: float
    unit: str
    window_samples: int
    hop_samples: int
    max_time_jitter_s: float = 0.002

    def __post_init__(self) -> None:
        if self.window_samples < 1 or self.hop_samples < 1:
            raise ValueError("window_samples and hop_samples must be >= 1")


@dataclasses.dataclass(frozen=True)
class PushResult:
    """What one chunk did to its stream: the windows it completed and the event, if any."""

    windows: tuple[Window, ...]
    event: str | None = None


class StreamWindower:
    """Ring buffer and window cutter for one ``site/machine/sensor`` stream.

    Not thread-safe: one worker thread owns all windowers.
    """

    def __init__(self, site: str, machine: str, sensor: str, settings: StreamSettings) -> None:
        self.site, self.machine, self.sensor = site, machine, sensor
        self.settings = settings
        self._rate = Fraction(settings.sample_rate_hz)
        self._tol_ns = max(settings.max_time_jitter_s, 1.0 / settings.sample_rate_hz) * 1e9
        cap = settings.window_samples + settings.hop_samples
        self._buf = np.empty(cap, dtype=np.float32)
        self._started = False
        self._seen: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # kept across restarts
        self._reset_state()

    # -- state ---------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._anchor_ns = 0  # time of sample 0 since the (re)start
        self._n_total = 0  # samples received since the (re)start
        self._buf_first = 0  # absolute index of self._buf[0]
        self._n = 0  # valid samples in self._buf
        self._next_window = 0  # absolute index where the next window starts
        self._window_index = 0
        self._last_seq: int | None = None

    def _ns_at(self, sample_index: int) -> int:
        """Time of absolute sample ``sample_index`` (exact: anchor + index / fs, in ns)."""
        return self._anchor_ns + (sample_index * 1_000_000_000 * self._rate.denominator) // self._rate.numerator

    @property
    def end_ns(self) -> int:
        """Time of the next expected sample (ns); meaningless before the first chunk."""
        return self._ns_at(self._n_total)

    @property
    def buffered_samples(self) -> int:
        return self._n

    # -- main entry ----------------------------------------------------------------------
    def push(self, chunk: Chunk) -> PushResult:
        """Append one chunk and return the windows it completes.

        Args:
            chunk: a decoded chunk of this stream, samples already in ``settings.unit``.

        Returns:
            the completed windows (possibly none) and the stream event the chunk caused:
            ``None``, or one of ``duplicate``, ``gap_seq``, ``gap_time``, ``restart``,
            ``rate_change`` (see module docstring).
        """
        event = None
        if self._started:
            event = self._classify(chunk)
            if event == "duplicate":
                return PushResult((), "duplicate")
            if event is not None:
                if event == "rate_change":
                    self._set_rate(chunk.sample_rate_hz)
                self._reset_state()
                self._started = False
        if not self._started:
            self._anchor_ns = chunk.ts_ns
            self._started = True
        self._last_seq = chunk.seq
        self._seen[chunk.seq] = chunk.digest
        self._seen.move_to_end(chunk.seq)
        while len(self._seen) > SEEN_SEQS:
            self._seen.popitem(last=False)
        return PushResult(self._append(chunk.samples), event)

    def _classify(self, chunk: Chunk) -> str | None:
        if chunk.sample_rate_hz != self.settings.sample_rate_hz:
            return "rate_change"
        assert self._last_seq is not None
        end = self.end_ns
        if chunk.seq <= self._last_seq:
            return "duplicate" if self._seen.get(chunk.seq) == chunk.digest else "restart"
        if chunk.seq != self._last_seq + 1:
            return "gap_seq"
        if abs(chunk.ts_ns - end) > self._tol_ns:
            return "gap_time"
        return None

    def _set_rate(self, sample_rate_hz: float) -> None:
        s = self.settings
        scale = sample_rate_hz / s.sample_rate_hz
        self.settings = dataclasses.replace(
            s,
            sample_rate_hz=sample_rate_hz,
            window_samples=max(1, round(s.window_samples * scale)),
            hop_samples=max(1, round(s.hop_samples * scale)),
        )
        self._rate = Fraction(sample_rate_hz)
        self._tol_ns = max(s.max_time_jitter_s, 1.0 / sample_rate_hz) * 1e9
        self._buf = np.empty(self.settings.window_samples + self.settings.hop_samples, dtype=np.float32)

    def _append(self, x: np.ndarray) -> tuple[Window, ...]:
        s = self.settings
        win, hop = s.window_samples, s.hop_samples
        out: list[Window] = []
        pos = 0
        while pos < x.size:
            # samples before the next window start that will never be needed (hop > window)
            skip = self._next_window - (self._buf_first + self._n)
            if skip > 0:
                take = min(skip, x.size - pos)
                pos += take
                self._buf_first += take
                self._n_total += take
                continue
            room = self._buf.size - self._n
            take = min(room, x.size - pos)
            self._buf[self._n:self._n + take] = x[pos:pos + take]
            self._n += take
            self._n_total += take
            pos += take
            # cut every window that is complete
            while self._next_window + win <= self._buf_first + self._n:
                lo = self._next_window - self._buf_first
                samples = self._buf[lo:lo + win].copy()  # the window's one copy: read-only, so Window keeps it
                samples.flags.writeable = False
                out.append(
                    Window(
                        site=self.site,
                        machine=self.machine,
                        sensor=self.sensor,
                        kind=s.kind,
                        start_ns=self._ns_at(self._next_window),
                        sample_rate_hz=s.sample_rate_hz,
                        unit=s.unit,  # type: ignore[arg-type]
                        samples=samples,
                        index=self._window_index,
                    )
                )
                self._window_index += 1
                self._next_window += hop
            # compact: drop samples before the next window start
            drop = min(self._next_window - self._buf_first, self._n)
            if drop > 0:
                self._buf[: self._n - drop] = self._buf[drop:self._n]
                self._n -= drop
                self._buf_first += drop
        return tuple(out)
