"""Shoal's development tooling, never installed in an image: ``shoal up`` (the whole fleet on one
machine), the process supervisor behind it and behind the cross-service tests' ``fleet``
fixture, and real nats-server / PostgreSQL servers started from their wheels.

Example::

    from shoal.devtools.embedded import EmbeddedNats, free_port

    nats = EmbeddedNats(port=free_port(), store_dir=tmp / "nats")
    nats.start()
    ...
    nats.stop()
"""
