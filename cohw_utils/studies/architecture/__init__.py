"""Chapter 2 (architecture analysis): the op inventory, hotspots and new operators
(:mod:`.inventory`) and the NeRF render+compute stages (:mod:`.render_pipeline`)."""
