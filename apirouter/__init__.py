"""apirouter shared core: config model, routing table codec, shared memory, errors.

Nothing in this package imports a server framework; workers/ and supervisor/ build on it.
"""

__version__ = "0.1.0"
