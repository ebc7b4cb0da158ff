"""AAS registry (AAS Part 2 API v3.1: AAS Registry + Submodel Registry) and its client.

* :mod:`registry.service` — the service (``RegistryServer``, ``serve_registry``), leases, capability lookup
* :mod:`registry.store`, :mod:`registry.models` — persistence (SQLite WAL by default, PostgreSQL by URL)
* :mod:`registry.client` — ``RegistryClient``, and the transient-only retry policy shared with AAS clients
* :mod:`registry.descriptors` — descriptor validation and how agents map onto descriptors
* :mod:`registry.part2`, :mod:`registry.identifiers` — HTTP plumbing shared with the per-agent AAS servers
* :mod:`registry.conformance` — response validation against the official OpenAPI files (tests)

Never imports ``agents`` or ``scenarios``.
"""
