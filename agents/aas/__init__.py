"""AAS helpers shared by every agent: semanticIds, ids, builders, (de)serialisation, hosting, clients.

Modules (import what you need; nothing here imports the rest of ``agents``):

* :mod:`agents.aas.semantics` — semanticIds as named constants (IDTA templates and ours)
* :mod:`agents.aas.ids` — base64url for URLs; ids of our shells, assets and submodels
* :mod:`agents.aas.build` — builders for shells and the Nameplate, Capabilities, BiddingParameters, Status,
  Order, ProcessPlan and ProcessDocumentation submodels
* :mod:`agents.aas.io` — JSON and AASX read/write (rejects packages that read back empty)
* :mod:`agents.aas.verify` — independent verification with aas-core3.1 (test dependency)
* :mod:`agents.aas.store`, :mod:`agents.aas.server` — one AAS server per agent process, single-writer writes
* :mod:`agents.aas.client` — async client for other agents' AAS servers
"""
