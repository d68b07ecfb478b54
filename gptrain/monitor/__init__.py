"""What a run reports as it goes: metrics.jsonl, the health monitor, the console, FLOPs and MFU."""
