#!/usr/bin/env bash
# A kvrelay cluster as plain processes (`kvrelay serve`) with Redis as the KV store:
# the layout for systemd units, Kubernetes Deployments or a single machine, no Ray.
# Each line is one process; on several machines, replace 127.0.0.1 with the hosts'
# addresses (and --host 0.0.0.0), give each worker --advertise HOST:PORT that the
# router can dial, and copy the TLS directory to every host. Every internal call
# (registration on the router's port 50052, Prefill, Decode) runs over mTLS with the
# certificates `kvrelay certs` makes, and every KV block carries a MAC.
#
#   bash deploy/configs/processes-redis.sh        # Ctrl-C stops everything
#   kvrelay generate "Hello"                      # in another shell
set -euo pipefail
MODEL=${MODEL:-dummy:tiny}
REDIS_PORT=${REDIS_PORT:-6379}
KV_STORE=redis://127.0.0.1:$REDIS_PORT
TLS_DIR=${TLS_DIR:-./kvrelay-tls}
KV_SECRET=${KV_SECRET:-./kvrelay-kv.secret}

[ -f "$TLS_DIR/ca.pem" ] || kvrelay certs "$TLS_DIR"
[ -f "$KV_SECRET" ] || (umask 077 && head -c 32 /dev/urandom > "$KV_SECRET")
WORKER=(--router 127.0.0.1:50052 --kv-store "$KV_STORE" --tls-dir "$TLS_DIR"
        --kv-secret-file "$KV_SECRET")

trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM

# Blocks get a TTL; with maxmemory set, Redis evicts least-recently-used blocks.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --maxmemory 2gb --maxmemory-policy allkeys-lru &
kvrelay serve router  --model "$MODEL" --port 50051 --tls-dir "$TLS_DIR" &
kvrelay serve prefill --model "$MODEL" "${WORKER[@]}" --worker-id prefill-0 &
kvrelay serve decode  --model "$MODEL" "${WORKER[@]}" --worker-id decode-0 &
kvrelay serve decode  --model "$MODEL" "${WORKER[@]}" --worker-id decode-1 &
wait
