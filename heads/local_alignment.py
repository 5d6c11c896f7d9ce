"""Local alignment's pooling step, as the heads see it.

The function lives in ``featstore.store.local_pool``: the store's derived field ``verb.local`` is made by
the same code (``featstore build`` / ``featstore derive``), and ``featstore`` never imports
``heads``. The data layer reads ``verb.local`` when a store holds it and pools ``verb.map`` (or
``verb.map_tmean``) at the ``det.local`` boxes with this function when it does not.
"""
from featstore.store.local_pool import pool_local_verb_features

__all__ = ["pool_local_verb_features"]
