"""`kvrelay bench`: the serving benchmark, driving a cluster through `Generate`.

One concept per module: `workload` (what to send), `arrivals` (when), `client`
(one gRPC stream per request, timestamped), `driver` (schedule + progress bar),
`metrics` (latencies and their tails, throughput, goodput, SLO attainment, cache
hit rate), `interference` (short requests' gaps during long prefills), `trials`
(medians and ranges over trials, goals every trial must meet), `result` (the JSON
document), `report` (the table), `plot`, `plot_timeline`, `plot_sweep` (the PNG),
`launcher` (clusters of pinned processes), `compare` (configurations in
interleaved trials), `sweep` (goodput against the arrival rate), `overhead`
(cluster vs local engine TTFT).
"""
