"""Recordings for replay and evaluation: the project's sample file and loaders for real datasets.

- :mod:`sample_data.loaders`: one loader per recording format (CWRU ``.mat``, FEMTO PRONOSTIA
  ``acc_*.csv`` folders, ``.wav`` incl. 8-channel MIMII, plain ``.csv`` / ``.npy`` arrays and the
  project's own ``.npz`` sample), all returning a :class:`~sample_data.loaders.Recording`;
  :func:`~sample_data.loaders.load_recording` picks the loader from the path.
- :mod:`sample_data.make_sample`: regenerates ``sim_outer_race.npz``, a 60 s synthetic
  vibration recording (SKF 6205 at 25 Hz, outer-race fault from 30 s) made by
  :class:`sensors.simulator.VibrationSimulator`.

See ``sample_data/README.md`` for the file format and the datasets' caveats.
"""
