"""Parts of bench/run: cgroup (CPU, memory), mta (the two instances), load (smtp-source, smtp-sink, latency and idle clients), report (summaries)."""
