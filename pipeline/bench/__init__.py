"""What tools/bench_io.py is built from: its modes, timing windows, the loader sweep, and the report (table, JSON,
plot)."""
