"""`kvrelay bench`: the serving benchmark, driving a cluster through `Generate`.

One concept per module: `workload` (what to send), `arrivals` (when), `client`
(one gRPC stream per request, timestamped), `driver` (schedule + progress bar),
`metrics` (latencies, throughput, goodput, cache hit rate), `result` (the JSON
document and comparisons), `report` (the table), `plot` (PNG), `launcher`
(clusters of pinned processes), `compare` (two configurations in one run),
`overhead` (cluster vs local engine TTFT).
"""
