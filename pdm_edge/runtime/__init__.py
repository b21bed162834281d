"""The runtime shell around the pipeline (DESIGN.md section 8): wiring, worker, health, metrics,
logging, systemd notify, and the end-to-end demo (:mod:`.demo`)."""
