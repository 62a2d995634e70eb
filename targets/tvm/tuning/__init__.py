"""MetaSchedule tuning for the TVM targets: `tuner` (the persistent database, the tuning worker
and its watchdog, applying records at compile time), `variants` (the default schedule's
hand-picked alternatives that tuning measures first)."""
