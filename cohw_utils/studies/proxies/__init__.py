"""Chapter 1 (proxy workloads): the proxy set at full scale (:mod:`.proxy_set`) and the ranking
by stated criteria (:mod:`.ranking`)."""
