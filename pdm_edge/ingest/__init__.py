"""Ingestion: waveform chunks over MQTT -> validated, windowed :class:`~pdm_edge.types.Window` s.

- :mod:`pdm_edge.ingest.chunk`: the chunk codec of the MQTT contract and its validation.
- :mod:`pdm_edge.ingest.windowing`: ring buffer per stream, windows with hop, gap handling.
- :mod:`pdm_edge.ingest.service`: :class:`Ingestor`, the MQTT client, queues and worker.
"""

from pdm_edge.ingest.chunk import DEADLETTER_REASONS, Chunk, decode_chunk, encode_chunk
from pdm_edge.ingest.service import IngestStats, Ingestor
from pdm_edge.ingest.windowing import StreamSettings, StreamWindower

__all__ = [
    "DEADLETTER_REASONS",
    "Chunk",
    "IngestStats",
    "Ingestor",
    "StreamSettings",
    "StreamWindower",
    "decode_chunk",
    "encode_chunk",
]
