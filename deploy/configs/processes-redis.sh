#!/usr/bin/env bash
# A kvrelay cluster as plain processes (`kvrelay serve`) with Redis as the KV store:
# the layout for systemd units, Kubernetes Deployments or a single machine, no Ray.
# Each line is one process; on several machines, replace 127.0.0.1 with the hosts'
# addresses and give each worker --advertise HOST:PORT that the router can dial.
#
#   bash deploy/configs/processes-redis.sh        # Ctrl-C stops everything
#   kvrelay generate "Hello"                      # in another shell
set -euo pipefail
MODEL=${MODEL:-dummy:tiny}
REDIS_PORT=${REDIS_PORT:-6379}
KV_STORE=redis://127.0.0.1:$REDIS_PORT

trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM

# Blocks get a TTL; with maxmemory set, Redis evicts least-recently-used blocks.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --maxmemory 2gb --maxmemory-policy allkeys-lru &
kvrelay serve router  --model "$MODEL" --port 50051 &
kvrelay serve prefill --model "$MODEL" --router 127.0.0.1:50051 --kv-store "$KV_STORE" \
  --host 127.0.0.1 --worker-id prefill-0 &
kvrelay serve decode  --model "$MODEL" --router 127.0.0.1:50051 --kv-store "$KV_STORE" \
  --host 127.0.0.1 --worker-id decode-0 &
kvrelay serve decode  --model "$MODEL" --router 127.0.0.1:50051 --kv-store "$KV_STORE" \
  --host 127.0.0.1 --worker-id decode-1 &
wait
