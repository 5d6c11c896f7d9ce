"""Sample data: generated inputs for tests, benchmarks and `featstore demo` (public, not the core).

No dataset can be downloaded here, so everything that reads frames, annotations or features is
exercised on data written by these generators:

- ``frames``: EPIC-layout JPEG folders and video files of painted frames whose index is readable back;
- ``damage``: the ways real inputs get damaged (truncated or garbage JPEGs, cut files);
- ``annotations``: annotation and video-info files in the EPIC-55 schemas;
- ``features``: random or planted-signal features in the layout ``featstore import`` reads;
- ``published``: published feature sets in their publishers' layouts (RULSTM LMDBs, TA3N pickles,
  LFB's Python-2 bank and frame lists) for ``featstore import --format``;
- ``kitchens``: the demo's synthetic kitchens, whose verbs only motion and nouns only appearance carry.
"""
