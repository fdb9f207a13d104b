"""adapt-serve on Ray Serve: session-affine engine replicas, per-turn Redis leases and fenced commits of
immutable state blobs (``pip install 'adapt-runtime[ray]'``; ``adapt-serve --ray ...``)."""
