"""Ray faces of the core: distributed fit, batch prediction with Ray Data, Ray Serve replicas.

Everything here needs the ``ray`` extra (``pip install 'defectscope[ray]'``) and is imported
lazily, so the rest of defectscope never depends on Ray. See ``docs/distributed.md``.
"""
