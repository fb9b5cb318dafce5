#!/usr/bin/env bash
# Make sure PostgreSQL accepts connections at 127.0.0.1:5432 (the tests need it); start the
# local cluster when it does not, and fail loudly when it cannot be started.
set -euo pipefail

host=127.0.0.1
port=5432

ready() { pg_isready -q -h "$host" -p "$port"; }

if ! command -v pg_isready >/dev/null; then
    echo "ensure-postgres: pg_isready not found; install PostgreSQL (the tests need it at $host:$port)" >&2
    exit 1
fi
if ready; then
    exit 0
fi

version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "$version" ]] || ! command -v pg_ctlcluster >/dev/null; then
    echo "ensure-postgres: PostgreSQL is not running at $host:$port and no local cluster was found to start" >&2
    exit 1
fi

echo "ensure-postgres: starting PostgreSQL $version (cluster main)" >&2
if ! pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
    echo "ensure-postgres: could not start PostgreSQL $version (pg_ctlcluster failed, see above)" >&2
    exit 1
fi
for _ in $(seq 1 30); do
    if ready; then
        exit 0
    fi
    sleep 1
done
echo "ensure-postgres: PostgreSQL $version did not accept connections at $host:$port within 30 s" >&2
exit 1
