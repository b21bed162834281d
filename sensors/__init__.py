"""Signal sources that feed pdm-edge: synthetic sensors and (in ``publisher``) MQTT publishing.

- :mod:`sensors.simulator`: physically plausible synthetic vibration (g) and sound-pressure (Pa)
  signals with seeded bearing / cavitation faults, streamed chunk by chunk, deterministic per seed.
"""
