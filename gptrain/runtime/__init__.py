"""The machinery a run stands on: devices and precision, processes, signals, random streams, files."""
