"""The chunk codec of the MQTT contract: round trips and every decode-level rejection reason."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from pdm_edge.errors import PayloadError
from pdm_edge.ingest.chunk import DEADLETTER_REASONS, decode_chunk, deadletter_payload, encode_chunk, parse_timestamp

TOPIC = "pdm/v1/plant1/pump-07/de/waveform"
LIMITS = {"max_payload_bytes": 1_000_000, "max_samples": 50_000}


def _decode(payload: bytes | dict, topic: str = TOPIC):
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return decode_chunk(topic, payload, **LIMITS)


def _reason(payload: bytes | dict, topic: str = TOPIC) -> str:
    with pytest.raises(PayloadError) as exc:
        _decode(payload, topic)
    assert exc.value.reason in DEADLETTER_REASONS
    return exc.value.reason


@pytest.mark.parametrize("encoding", ["float32", "int16", "values"])
def test_round_trip_every_encoding(encoding):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(2560) * 0.3).astype(np.float32)
    payload = encode_chunk(x, ts_ns=1_763_712_000_123_456_789, sample_rate_hz=25600, unit="g", seq=7, encoding=encoding)
    c = _decode(payload)
    assert (c.site, c.machine, c.sensor) == ("plant1", "pump-07", "de")
    assert c.ts_ns == 1_763_712_000_123_456_789 and c.seq == 7 and c.sample_rate_hz == 25600 and c.unit == "g"
    assert c.samples.dtype == np.float32 and c.samples.shape == (2560,)
    if encoding == "int16":
        # quantisation: at most half a count of the chosen scale
        scale = json.loads(payload)["scale"]
        assert np.max(np.abs(c.samples - x)) <= scale * 0.5 + 1e-7
    else:
        np.testing.assert_array_equal(c.samples, x)


def test_int16_with_explicit_scale_and_float32_with_scale():
    counts = np.array([0, 1000, -1000, 32767], dtype="<i2")
    c = _decode({"ts": 0, "fs": 12000, "unit": "m/s2", "seq": 0, "dtype": "int16", "scale": 0.01,
                 "data": base64.b64encode(counts.tobytes()).decode()})
    np.testing.assert_allclose(c.samples, counts * 0.01, rtol=1e-6)
    c = _decode({"ts": 0, "fs": 12000, "unit": "g", "seq": 0, "dtype": "float32", "scale": 2.0,
                 "data": base64.b64encode(np.array([1.5, -2.0], "<f4").tobytes()).decode()})
    np.testing.assert_array_equal(c.samples, [3.0, -4.0])


@pytest.mark.parametrize("ts, ns", [
    ("2026-11-21T08:00:00Z", 1_795_248_000_000_000_000),
    ("2026-11-21T09:00:00.000001+01:00", 1_795_248_000_000_001_000),
    (1_795_248_000_000_000_000, 1_795_248_000_000_000_000),
])
def test_timestamps(ts, ns):
    assert parse_timestamp(ts) == ns


@pytest.mark.parametrize("ts", ["2026-11-21T08:00:00", "yesterday", 1.7e18, -1, True, None, 2**64])
def test_bad_timestamps(ts):
    with pytest.raises(PayloadError) as exc:
        parse_timestamp(ts)
    assert exc.value.reason == "bad_timestamp"


def _good(**over):
    d = {"ts": 0, "fs": 25600, "unit": "g", "seq": 0, "dtype": "float32",
         "data": base64.b64encode(np.zeros(4, "<f4").tobytes()).decode()}
    d.update(over)
    return {k: v for k, v in d.items() if v is not ...}


@pytest.mark.parametrize("payload, topic, reason", [
    (_good(), "pdm/v1/plant1/pump 07/de/waveform", "bad_topic"),
    (_good(), "pdm/v1/plant1/de/waveform", "bad_topic"),
    (_good(), "pdm/v2/a/b/c/waveform", "bad_topic"),
    (b"\xff\xfe\x00garbage", TOPIC, "bad_encoding"),
    (b"{not json", TOPIC, "bad_json"),
    (b"[1, 2, 3]", TOPIC, "bad_json"),
    (b"", TOPIC, "bad_json"),
    (_good(seq=...), TOPIC, "bad_schema"),
    (_good(fs="25600"), TOPIC, "bad_schema"),
    (_good(fs=-1), TOPIC, "bad_schema"),
    (_good(unit="furlongs"), TOPIC, "bad_schema"),
    (_good(seq=-3), TOPIC, "bad_schema"),
    (_good(extra=1), TOPIC, "bad_schema"),
    (_good(data=...), TOPIC, "bad_schema"),
    (_good(data=12), TOPIC, "bad_schema"),
    (_good(ts="noon"), TOPIC, "bad_timestamp"),
    (_good(dtype="float64"), TOPIC, "bad_dtype"),
    (_good(dtype="int16"), TOPIC, "bad_dtype"),  # int16 needs a scale
    (_good(scale=0), TOPIC, "bad_dtype"),
    (_good(data="!!!not base64!!!"), TOPIC, "bad_base64"),
    (_good(data=base64.b64encode(b"\x00\x00\x80").decode()), TOPIC, "bad_length"),
    (_good(data=""), TOPIC, "bad_length"),
    (_good(data=base64.b64encode(np.array([1.0, np.nan], "<f4").tobytes()).decode()), TOPIC, "non_finite"),
    (_good(data=base64.b64encode(np.array([np.inf], "<f4").tobytes()).decode()), TOPIC, "non_finite"),
    (_good(scale=float("nan")), TOPIC, "non_finite"),
    (_good(data=base64.b64encode(np.zeros(60_000, "<f4").tobytes()).decode()), TOPIC, "too_large"),
    (b"{" + b" " * 1_000_001 + b"}", TOPIC, "too_large"),
])
def test_rejection_reasons(payload, topic, reason):
    assert _reason(payload, topic) == reason


@pytest.mark.parametrize("values, reason", [
    ([], "bad_length"),
    ([1.0, "x"], "bad_schema"),
    ([1.0, True], "bad_schema"),
    ("1,2,3", "bad_schema"),
    (list(range(60_000)), "too_large"),
])
def test_values_rejections(values, reason):
    assert _reason({"ts": 0, "fs": 100, "unit": "g", "seq": 0, "values": values}) == reason


def test_values_nan_literal_and_overflow_are_non_finite():
    # Python's json accepts the NaN/Infinity tokens that some publishers emit
    assert _reason(b'{"ts":0,"fs":100,"unit":"g","seq":0,"values":[1.0, NaN]}') == "non_finite"
    assert _reason(b'{"ts":0,"fs":100,"unit":"g","seq":0,"values":[1e300]}') == "non_finite"


def test_values_cannot_mix_with_data():
    assert _reason(_good(values=[1.0])) == "bad_schema"


def test_deadletter_payload_keeps_reason_topic_and_head():
    err = PayloadError("bad_json", "Expecting value")
    raw = b"\xff" * 1000
    d = json.loads(deadletter_payload(TOPIC, raw, err))
    assert d["reason"] == "bad_json" and d["topic"] == TOPIC and d["bytes"] == 1000
    assert base64.b64decode(d["head_b64"]) == raw[:256]
