"""Preparing the real datasets: the format logic behind the data tools (``python -m lightning_modules ...``).

- ``video_check``: decode a video the way the data modules will (open, then its first, middle and last frame)
  and say why it is unusable, in ``video_io``'s kinds of bad video.
- ``video_lists``: the videos any of the project's list or annotation formats names (a folder, a plain list of
  paths, a Kinetics-style list, an ActivityNet / OpenTAD JSON, an AVA CSV), and the same list written back
  without the bad ones.
- ``ava_movies``: AVA's 15-minute cut of each movie (seconds 900-1801, as PySlowFast prepares it) and its
  frames at 30 fps in the folder layout ``AVADataModule`` reads.
- ``kinetics_tree``: Kinetics-style lists and a class index from a ``<split>/<class>/<video>`` folder tree, and
  Mini-Kinetics as a subset of it.
- ``tad_annotations``: the official THUMOS14 per-class annotation files to the JSON the temporal detection data
  module reads, and the ActivityNet-1.3 JSON checked against the videos, with what the release lacks filled in.

Nothing here imports Lightning; the readers of each format stay where the data modules have them.
"""
