"""Sessions: each conversation's fast-weight state, kept, persisted and taken one turn at a time.

It owns the store interface (``store.SessionStoreProtocol``) and its two implementations: one process
(``local_store``: memory under a byte budget, spilled to files laid out by ``files``) and the cluster
(``cluster_store``: Redis leases and shared blobs, from ``serving.cluster``); and the turn (``turn``), one
request's hold on its session, committed or rolled back. Nothing here speaks HTTP: failures are raised as the domain
errors of ``serving.failures``.
"""
