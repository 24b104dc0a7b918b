"""Chapter 4.5 (how good are the predictions?): the ledger of published measurements
(:mod:`.ledger`) and the request predictor it checks (:mod:`.predict`)."""
