#!/usr/bin/env bash
# Runs every test of the workspace. Makes a PostgreSQL server available first: the one on
# 127.0.0.1:5432 when it answers, else the installed cluster (started), else a throwaway cluster
# initialised in a temporary directory (installing the Debian package when PostgreSQL is absent).
set -euo pipefail
cd "$(dirname "$0")/.."

PGHOST_ADDR=127.0.0.1
PGPORT_DEFAULT=5432

log() { echo "test.sh: $*" >&2; }

pg_answers() { # port
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PGHOST_ADDR" -p "$1" -t 2
  else
    (exec 3<>"/dev/tcp/$PGHOST_ADDR/$1") 2>/dev/null
  fi
}

pg_bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

install_postgres() {
  log "PostgreSQL is not installed; installing the Debian package"
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    log "using DATABASE_URL from the environment"
    return
  fi
  if pg_answers "$PGPORT_DEFAULT"; then
    export DATABASE_URL="postgres://postgres@$PGHOST_ADDR:$PGPORT_DEFAULT/postgres"
    return
  fi
  if command -v pg_lsclusters >/dev/null 2>&1 && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
    local ver name
    read -r ver name _ < <(pg_lsclusters -h | head -n 1)
    log "starting the installed cluster $ver/$name"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start || true
    for _ in $(seq 1 30); do pg_answers "$PGPORT_DEFAULT" && break; sleep 1; done
    if pg_answers "$PGPORT_DEFAULT"; then
      export DATABASE_URL="postgres://postgres@$PGHOST_ADDR:$PGPORT_DEFAULT/postgres"
      return
    fi
  fi
  [ -n "$(pg_bindir)" ] || install_postgres
  local bin dir port
  bin="$(pg_bindir)"
  dir="$(mktemp -d /tmp/xpu-pg.XXXXXX)"
  port=55432
  log "initialising a throwaway cluster in $dir on port $port"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir" 2>/dev/null || true
    run_pg() { su postgres -s /bin/sh -c "$*"; }
  else
    run_pg() { sh -c "$*"; }
  fi
  run_pg "'$bin/initdb' -D '$dir/data' -U postgres -A trust >/dev/null"
  run_pg "'$bin/pg_ctl' -D '$dir/data' -o '-p $port -k $dir -c listen_addresses=$PGHOST_ADDR -c max_connections=300 -c fsync=off' -l '$dir/log' -w start >/dev/null"
  trap "run_pg \"'$bin/pg_ctl' -D '$dir/data' -m fast stop\" >/dev/null 2>&1 || true; rm -rf '$dir'" EXIT
  export DATABASE_URL="postgres://postgres@$PGHOST_ADDR:$port/postgres"
}

# The dataplane and pod-attach tests run in network namespaces and drive nftables and ping.
ensure_tools() {
  local missing=()
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  # The TLS scanner check of the broker's listener.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # The dashboard's browser test.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  # The load generator's smoke run sets the broker beside etcd 3.4.
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_tools
ensure_postgres
log "DATABASE_URL=$DATABASE_URL"
cargo test --workspace --locked "$@"
