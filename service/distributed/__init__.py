"""Beyond one machine, on Ray: slide archives scored by a pool of actors (``archive``).

Ray is the optional ``distributed`` extra; nothing here imports it until a cluster is used, so the
plain service and its CLI never need it.
"""
