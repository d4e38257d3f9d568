#!/usr/bin/env bash
# Ensure the local services the test suite needs are installed, configured and running.
#
# Idempotent: on a machine that is already set up it prints nothing and exits 0.
# Whenever it changes something it says so on stdout, prefixed with "services.sh:".
# Must run as root (apt-get, pg_ctlcluster, make install).
#
#   - jq
#   - chromium (headless, for the HTML report's browser test)
#   - pgvector for the installed PostgreSQL major version
#     (Debian package postgresql-<major>-pgvector when apt knows it; Debian 12
#     "bookworm" ships no pgvector package at all, so otherwise it is built from
#     the Debian source package of $PGVECTOR_SRC_SUITE against
#     postgresql-server-dev-<major>)
#   - PostgreSQL running on 127.0.0.1:5432, pg_stat_statements preloaded,
#     extensions vector and pg_stat_statements in database "test",
#     non-superuser role rag_reader (LOGIN, pg_read_all_stats, CONNECT on test)
#   - Redis running on 127.0.0.1:6379
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
PG_DB=test
READER_ROLE=rag_reader
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
WAIT_SECONDS=${SERVICES_WAIT_SECONDS:-30}
# The Debian mirror this machine's apt already uses (first "URIs:" of the main archive).
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
if [ -z "$DEBIAN_MIRROR" ] && [ -f /etc/apt/sources.list ]; then
    DEBIAN_MIRROR=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
fi
PGVECTOR_SRC_SUITE=${PGVECTOR_SRC_SUITE:-trixie}

export DEBIAN_FRONTEND=noninteractive

say() { printf 'services.sh: %s\n' "$*"; }
die() {
    printf 'services.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

# Run a command with its output captured; show the output only if it fails.
quietly() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf 'services.sh: command failed (exit %s): %s\n' "$rc" "$*" >&2
        cat "$log" >&2
        rm -f "$log"
        exit "$rc"
    fi
    rm -f "$log"
}

[ "$(id -u)" -eq 0 ] || die "must run as root"

# ---------------------------------------------------------------- apt helpers
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        quietly apt-get update
        APT_UPDATED=1
    fi
}

apt_install() {
    apt_update_once
    say "apt-get install -y $*"
    quietly apt-get install -y --no-install-recommends "$@"
}

apt_has_candidate() {
    local cand
    cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

# ------------------------------------------------------------------------ jq
if ! command -v jq >/dev/null 2>&1; then
    apt_install jq
fi

# ------------------------------------------------------------------ chromium
if ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium
fi

# ---------------------------------------------------------- PostgreSQL major
[ -d /etc/postgresql ] || die "/etc/postgresql not found: is PostgreSQL installed?"
PG_VER=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n 1)
[ -n "$PG_VER" ] || die "no cluster under /etc/postgresql"
PG_BIN=/usr/lib/postgresql/$PG_VER/bin
PG_CONFIG=$PG_BIN/pg_config

pgvector_installed() {
    [ -f "/usr/share/postgresql/$PG_VER/extension/vector.control" ] &&
        [ -f "/usr/lib/postgresql/$PG_VER/lib/vector.so" ]
}

build_pgvector_from_debian_source() {
    apt_install "postgresql-server-dev-$PG_VER"
    local tmp apt_opts src
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/src"
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$DEBIAN_MIRROR" "$PGVECTOR_SRC_SUITE" >"$tmp/sources.list"
    # A private source list and index: the system's apt configuration is left untouched.
    apt_opts=(
        -o "Dir::Etc::sourcelist=$tmp/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$tmp/lists"
        -o "Dir::Cache=$tmp/cache"
        -o "APT::Get::List-Cleanup=0"
        -o "Acquire::Languages=none"
        -o "APT::Sandbox::User=root"
    )
    say "fetching Debian source package pgvector from $PGVECTOR_SRC_SUITE"
    quietly apt-get "${apt_opts[@]}" update
    (cd "$tmp/src" && quietly apt-get "${apt_opts[@]}" source pgvector)
    src=$(find "$tmp/src" -mindepth 1 -maxdepth 1 -type d -name 'pgvector-*' | head -n 1)
    [ -n "$src" ] || die "apt-get source pgvector produced no source tree"
    say "building $(basename "$src") for PostgreSQL $PG_VER"
    # OPTFLAGS="" avoids upstream's default -march=native (as Debian's own build does).
    quietly make -C "$src" -j "$(nproc)" PG_CONFIG="$PG_CONFIG" OPTFLAGS=""
    quietly make -C "$src" install PG_CONFIG="$PG_CONFIG" OPTFLAGS=""
    rm -rf "$tmp"
    trap - EXIT
}

if ! pgvector_installed; then
    apt_update_once
    if apt_has_candidate "postgresql-$PG_VER-pgvector"; then
        apt_install "postgresql-$PG_VER-pgvector"
    else
        say "no Debian package postgresql-$PG_VER-pgvector in this release's archive"
        build_pgvector_from_debian_source
    fi
    pgvector_installed || die "pgvector install finished but vector.control/vector.so are missing"
fi

# ---------------------------------------------------------- PostgreSQL up
pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1; }

wait_pg_ready() {
    local i
    for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
        pg_ready && return 0
        sleep 0.5
    done
    die "PostgreSQL $PG_VER/main not accepting connections on $PG_HOST:$PG_PORT after ${WAIT_SECONDS}s (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
}

if ! pg_ready; then
    # Starting an already running (e.g. still recovering) cluster is an error: check first.
    if pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main status >/dev/null 2>&1; then
        say "PostgreSQL $PG_VER/main is running but not ready yet; waiting"
    else
        say "starting PostgreSQL $PG_VER/main"
        quietly pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main start
    fi
    wait_pg_ready
fi

psql_q() {
    local db=$1
    shift
    psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$db" -X -q -A -t -v ON_ERROR_STOP=1 -c "$@"
}

if [ "$(psql_q postgres "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    say "creating database $PG_DB"
    psql_q postgres "CREATE DATABASE $PG_DB" >/dev/null
fi

# ------------------------------------------------ pg_stat_statements preload
preload=$(psql_q "$PG_DB" "SHOW shared_preload_libraries")
libs=()
if [ -n "$preload" ]; then
    IFS=',' read -r -a raw <<<"$preload"
    for lib in "${raw[@]}"; do
        lib=$(printf '%s' "$lib" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e 's/^"\(.*\)"$/\1/')
        [ -n "$lib" ] && libs+=("$lib")
    done
fi
have_pss=0
for lib in "${libs[@]+"${libs[@]}"}"; do
    [ "$lib" = pg_stat_statements ] && have_pss=1
done
if [ "$have_pss" -eq 0 ]; then
    libs+=(pg_stat_statements)
    value=""
    for lib in "${libs[@]}"; do
        value+="${value:+, }'${lib//\'/\'\'}'"
    done
    say "ALTER SYSTEM SET shared_preload_libraries = $value; restarting PostgreSQL $PG_VER/main"
    psql_q "$PG_DB" "ALTER SYSTEM SET shared_preload_libraries = $value" >/dev/null
    quietly pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main restart
    wait_pg_ready
    case ", $(psql_q "$PG_DB" "SHOW shared_preload_libraries"), " in
    *pg_stat_statements*) ;;
    *) die "pg_stat_statements still not in shared_preload_libraries after restart" ;;
    esac
fi

# ------------------------------------------------------------- extensions
for ext in vector pg_stat_statements; do
    if [ "$(psql_q "$PG_DB" "SELECT 1 FROM pg_extension WHERE extname = '$ext'")" != 1 ]; then
        say "CREATE EXTENSION $ext in database $PG_DB"
        psql_q "$PG_DB" "CREATE EXTENSION IF NOT EXISTS $ext" >/dev/null
    fi
done

# ------------------------------------------------- non-superuser test role
if [ "$(psql_q "$PG_DB" "SELECT 1 FROM pg_roles WHERE rolname = '$READER_ROLE'")" != 1 ]; then
    say "CREATE ROLE $READER_ROLE LOGIN"
    psql_q "$PG_DB" "CREATE ROLE $READER_ROLE LOGIN" >/dev/null
fi
if [ "$(psql_q "$PG_DB" "SELECT 1 FROM pg_auth_members m
        JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member
        WHERE r.rolname = 'pg_read_all_stats' AND u.rolname = '$READER_ROLE'")" != 1 ]; then
    say "GRANT pg_read_all_stats TO $READER_ROLE"
    psql_q "$PG_DB" "GRANT pg_read_all_stats TO $READER_ROLE" >/dev/null
fi
if [ "$(psql_q "$PG_DB" "SELECT 1 FROM pg_database d, aclexplode(d.datacl) a
        WHERE d.datname = '$PG_DB' AND a.grantee = '$READER_ROLE'::regrole
        AND a.privilege_type = 'CONNECT'")" != 1 ]; then
    say "GRANT CONNECT ON DATABASE $PG_DB TO $READER_ROLE"
    psql_q "$PG_DB" "GRANT CONNECT ON DATABASE $PG_DB TO $READER_ROLE" >/dev/null
fi

# ------------------------------------------------------------------ Redis
redis_ready() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

if ! redis_ready; then
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    say "starting redis-server on $REDIS_HOST:$REDIS_PORT"
    quietly redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no
    ok=0
    for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
        if redis_ready; then
            ok=1
            break
        fi
        sleep 0.5
    done
    [ "$ok" -eq 1 ] || die "Redis not answering PONG on $REDIS_HOST:$REDIS_PORT after ${WAIT_SECONDS}s"
fi
