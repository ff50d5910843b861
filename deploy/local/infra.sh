#!/usr/bin/env bash
# CityPark's local infrastructure on loopback: PostgreSQL, Redis and a single-node KRaft Kafka.
#
#   deploy/local/infra.sh up       install what is missing, start what is not running, wait until
#                                  healthy, create the role/database and the Kafka topics
#   deploy/local/infra.sh down     stop what we started (fine when nothing runs)
#   deploy/local/infra.sh status   one line per server; exit 1 if any is not answering
#   deploy/local/infra.sh restart postgres|redis|kafka [SECONDS]
#                                  stop one server of ours, leave it down SECONDS (default 0),
#                                  start it again (fault drills)
#
# Idempotent: a healthy server of ours (pid file matches) or any server on the port that answers
# properly is reused; stale pid files are removed. Data, logs and pid files: <repo>/.local/, or
# CITYPARK_INFRA_DIR (relative to the repo) for a second, independent set of servers; the
# Kafka jars are shared between sets (CITYPARK_KAFKA_LIBS, default <repo>/.local/kafka/libs).
# Env: CITYPARK_PG_PORT (5432) CITYPARK_REDIS_PORT (6379) CITYPARK_KAFKA_PORT (9092)
#      CITYPARK_KAFKA_CONTROLLER_PORT (kafka port + 1) CITYPARK_KAFKA_PARTITIONS (3)
#      CITYPARK_INFRA_TIMEOUT (60 s per server) CITYPARK_PYTHON (<repo>/.venv/bin/python)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOCAL=${CITYPARK_INFRA_DIR:-.local}
[[ $LOCAL == /* ]] || LOCAL="$ROOT/$LOCAL"
HOST=127.0.0.1
PG_PORT=${CITYPARK_PG_PORT:-5432}
REDIS_PORT=${CITYPARK_REDIS_PORT:-6379}
KAFKA_PORT=${CITYPARK_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${CITYPARK_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
TIMEOUT=${CITYPARK_INFRA_TIMEOUT:-60}
PY=${CITYPARK_PYTHON:-$ROOT/.venv/bin/python}

REDIS_DIR="$LOCAL/redis"
REDIS_PIDFILE="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
K_DIR="$LOCAL/kafka"
K_LIBS=${CITYPARK_KAFKA_LIBS:-$ROOT/.local/kafka/libs}
K_DATA="$K_DIR/data"
K_LOGS="$K_DIR/logs"
K_CONF="$K_DIR/server.properties"
K_PIDFILE="$K_DIR/kafka.pid"
K_POM="$HERE/kafka/pom.xml"

# ---------------------------------------------------------------- helpers
now_ms() { date +%s%3N; }
took() { local d=$(($(now_ms) - $1)); printf '%d.%d s' $((d / 1000)) $((d % 1000 / 100)); }
say() { printf '%s\n' "$*"; }
die() { printf '%s\n' "$*" >&2; exit 1; }
fail_with_log() { # message, log file...
  printf '%s\n' "$1" >&2
  shift
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    printf -- '--- last lines of %s:\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
  exit 1
}
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
# alive = exists and is not a zombie (an exited daemon stays one until PID 1 reaps it)
pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) != Z ]]; }
read_pid() { [[ -s $1 ]] && head -n1 "$1" | tr -dc 0-9 || true; }
# poll CMD every 0.2 s until it succeeds or TIMEOUT seconds pass (never a fixed sleep)
wait_for() {
  local deadline=$(($(date +%s) + TIMEOUT))
  until "$@"; do
    (($(date +%s) < deadline)) || return 1
    sleep 0.2
  done
}
is_root() { [[ $(id -u) == 0 ]]; }
# run as the postgres system user (PostgreSQL refuses root), from / so its cwd is readable
as_pg() { if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

ensure_packages() { # install (apt) only what is missing
  local need=()
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || need+=(redis-server)
  command -v java >/dev/null || need+=(default-jre-headless)
  if ! kafka_libs_ok && ! command -v mvn >/dev/null; then need+=(maven); fi
  ((${#need[@]})) || return 0
  is_root || die "packages: missing ${need[*]}: apt-get install ${need[*]} (as root)"
  local t log="$LOCAL/apt.log"
  t=$(now_ms)
  say "packages: installing ${need[*]} (apt) ..."
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; } \
    >"$log" 2>&1 || fail_with_log "packages: apt-get failed" "$log"
  say "packages: installed ${need[*]} ($(took "$t"))"
}

# ---------------------------------------------------------------- PostgreSQL
pg_setup_paths() {
  local major
  PG_BASE="$LOCAL/pg"
  [[ -L $PG_BASE ]] && PG_BASE=$(readlink -f "$PG_BASE")
  PG_DATA="$PG_BASE/data"
  PG_SOCK="$PG_BASE/run"
  PG_LOG="$PG_BASE/postgres.log"
  if [[ -s $PG_DATA/PG_VERSION && -x /usr/lib/postgresql/$(<"$PG_DATA/PG_VERSION")/bin/postgres ]]; then
    major=$(<"$PG_DATA/PG_VERSION")
  else
    major=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1 || true)
  fi
  PG_BIN="/usr/lib/postgresql/${major:-none}/bin"
}

pg_prepare_dirs() {
  mkdir -p "$PG_BASE"
  is_root && chown postgres:postgres "$PG_BASE"
  # The postgres user must reach the data dir, and a socket path has at most 107 bytes:
  # otherwise keep the cluster under /var/tmp and leave .local/pg as a symlink to it.
  if { is_root && ! runuser -u postgres -- test -w "$PG_BASE"; } || ((${#PG_SOCK} > 90)); then
    local alt
    local key=$ROOT # the default set keeps its historical place; another set gets its own
    [[ $LOCAL == "$ROOT/.local" ]] || key=$LOCAL
    alt="/var/tmp/citypark-pg-$(printf %s "$key" | md5sum | cut -c1-12)"
    mkdir -p "$alt"
    is_root && chown postgres:postgres "$alt"
    rmdir "$LOCAL/pg" 2>/dev/null || true
    [[ -e $LOCAL/pg ]] || ln -s "$alt" "$LOCAL/pg"
    PG_BASE=$alt PG_DATA="$alt/data" PG_SOCK="$alt/run" PG_LOG="$alt/postgres.log"
  fi
  as_pg mkdir -p "$PG_SOCK"
}

pg_running_ours() { [[ -s $PG_DATA/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }
pg_our_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null | tr -dc 0-9 || true; }
pg_ready() { "$PG_BIN/pg_isready" -q -h "$HOST" -p "$1" -t 2; }
pg_citypark_ok() { # the check a client makes: log in as citypark over TCP
  PGPASSWORD=citypark PGCONNECT_TIMEOUT=3 "$PG_BIN/psql" -X -q -w -h "$HOST" -p "$PG_PORT" \
    -U citypark -d citypark -tAc 'select 1' >/dev/null 2>&1
}
pg_admin() { as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres "$@"; }

pg_write_conf() { # our settings, rewritten on every start (ports may change through env)
  local q="'"
  as_pg tee "$PG_DATA/citypark.conf" >/dev/null <<EOF
# written by deploy/local/infra.sh on every start
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '${PG_SOCK//$q/$q$q}'
unix_socket_permissions = 0700
max_connections = 300
# disposable development/test data: durability off for speed
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

pg_stop_debian_cluster_on_port() { # a cluster the Debian package created and started, on our port
  command -v pg_lsclusters >/dev/null || return 1
  local ver name port status _ stopped=1
  while read -r ver name port status _; do
    if [[ $port == "$PG_PORT" && $status == online* ]]; then
      say "postgres: stopping Debian's cluster $ver/$name, which holds port $PG_PORT"
      pg_ctlcluster "$ver" "$name" stop -m fast >/dev/null 2>&1 || pg_ctlcluster "$ver" "$name" stop -m immediate
      stopped=0
    fi
  done < <(pg_lsclusters -h 2>/dev/null)
  return $stopped
}

pg_up() {
  local t
  t=$(now_ms)
  pg_setup_paths
  [[ -x $PG_BIN/postgres ]] || die "postgres: no server binaries in $PG_BIN"
  if pg_running_ours; then
    if [[ $(pg_our_port) != "$PG_PORT" ]]; then
      say "postgres: ours runs on port $(pg_our_port), restarting on $PG_PORT"
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -s stop
    elif wait_for pg_ready "$PG_PORT"; then
      pg_ensure_db
      say "postgres: reusing ours on $HOST:$PG_PORT ($(took "$t"))"
      return
    else
      fail_with_log "postgres: ours (pid $(read_pid "$PG_DATA/postmaster.pid")) does not answer on $PG_PORT" "$PG_LOG"
    fi
  fi
  if [[ -e $PG_DATA/postmaster.pid ]]; then
    say "postgres: removing stale $PG_DATA/postmaster.pid"
    rm -f "$PG_DATA/postmaster.pid"
  fi
  if port_open "$PG_PORT"; then
    if pg_citypark_ok; then
      say "postgres: reusing the server already on $HOST:$PG_PORT (not ours; citypark logs in)"
      return
    fi
    pg_stop_debian_cluster_on_port && wait_for eval "! port_open $PG_PORT" ||
      die "postgres: port $PG_PORT is held by something that does not accept citypark/citypark (set CITYPARK_PG_PORT)"
  fi
  pg_prepare_dirs
  if [[ ! -s $PG_DATA/PG_VERSION ]]; then
    as_pg rm -rf "$PG_DATA"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 --auth-local=trust \
      --auth-host=scram-sha-256 -N --no-instructions >"$PG_BASE/initdb.log" 2>&1 ||
      fail_with_log "postgres: initdb failed" "$PG_BASE/initdb.log"
    echo "include_if_exists = 'citypark.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
    say "postgres: initialised $PG_DATA"
  fi
  pg_write_conf
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" -s start >/dev/null 2>&1 9>&- ||
    fail_with_log "postgres: did not start within ${TIMEOUT}s" "$PG_LOG"
  wait_for pg_ready "$PG_PORT" || fail_with_log "postgres: not accepting connections on $PG_PORT" "$PG_LOG"
  pg_ensure_db
  say "postgres: started on $HOST:$PG_PORT ($(took "$t"))"
}

pg_ensure_db() {
  pg_admin -f - <<'SQL' >/dev/null
DO $$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'citypark') THEN
    CREATE ROLE citypark LOGIN CREATEDB PASSWORD 'citypark';
  END IF;
END$$;
SELECT 'CREATE DATABASE citypark OWNER citypark'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'citypark')\gexec
SQL
  pg_citypark_ok || fail_with_log "postgres: citypark cannot log in on $HOST:$PG_PORT" "$PG_LOG"
}

pg_down() {
  local t
  t=$(now_ms)
  pg_setup_paths
  if [[ -x $PG_BIN/pg_ctl ]] && pg_running_ours; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$TIMEOUT" -s stop
    say "postgres: stopped ($(took "$t"))"
  else
    [[ -e $PG_DATA/postmaster.pid ]] && rm -f "$PG_DATA/postmaster.pid" && say "postgres: removed stale pid file"
    say "postgres: not running"
  fi
}

pg_status() {
  pg_setup_paths
  if [[ -x $PG_BIN/pg_ctl ]] && pg_running_ours; then
    local port
    port=$(pg_our_port)
    if pg_ready "$port"; then
      say "postgres: running on $HOST:$port (ours, pid $(read_pid "$PG_DATA/postmaster.pid"))"
    else
      say "postgres: ours (pid $(read_pid "$PG_DATA/postmaster.pid")) not answering on $port"; return 1
    fi
  elif [[ -x $PG_BIN/pg_isready ]] && pg_ready "$PG_PORT"; then
    say "postgres: running on $HOST:$PG_PORT (not ours)"
  else
    say "postgres: stopped"; return 1
  fi
}

# ---------------------------------------------------------------- Redis
redis_ping() { [[ $(timeout 3 redis-cli -h "$HOST" -p "$1" ping 2>/dev/null) == PONG ]]; }
redis_our_pid() {
  local pid
  pid=$(read_pid "$REDIS_PIDFILE")
  pid_alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] && echo "$pid"
}
redis_our_port() { cat "$REDIS_DIR/port" 2>/dev/null || echo "$REDIS_PORT"; }

redis_up() {
  local t pid
  t=$(now_ms)
  mkdir -p "$REDIS_DIR"
  if pid=$(redis_our_pid); then
    if [[ $(redis_our_port) != "$REDIS_PORT" ]]; then
      say "redis: ours runs on port $(redis_our_port), restarting on $REDIS_PORT"
      redis_down >/dev/null
    elif wait_for redis_ping "$REDIS_PORT"; then
      say "redis: reusing ours on $HOST:$REDIS_PORT ($(took "$t"))"
      return
    else
      fail_with_log "redis: ours (pid $pid) does not answer on $REDIS_PORT" "$REDIS_LOG"
    fi
  fi
  [[ -e $REDIS_PIDFILE ]] && say "redis: removing stale $REDIS_PIDFILE" && rm -f "$REDIS_PIDFILE"
  if port_open "$REDIS_PORT"; then
    redis_ping "$REDIS_PORT" ||
      die "redis: port $REDIS_PORT is held by something that does not answer PING (set CITYPARK_REDIS_PORT)"
    say "redis: reusing the server already on $HOST:$REDIS_PORT (not ours; answers PING)"
    return
  fi
  echo "$REDIS_PORT" >"$REDIS_DIR/port"
  # AOF, fsynced every second: a restart keeps the gate state and the used nonces.
  redis-server --port "$REDIS_PORT" --bind "$HOST" --protected-mode yes --save "" \
    --appendonly yes --appendfsync everysec \
    --daemonize yes --dir "$REDIS_DIR" --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" 9>&- ||
    fail_with_log "redis: redis-server failed" "$REDIS_LOG"
  wait_for redis_ping "$REDIS_PORT" || fail_with_log "redis: no PONG on $REDIS_PORT within ${TIMEOUT}s" "$REDIS_LOG"
  say "redis: started on $HOST:$REDIS_PORT ($(took "$t"))"
}

redis_down() {
  local t pid
  t=$(now_ms)
  if pid=$(redis_our_pid); then
    timeout 10 redis-cli -h "$HOST" -p "$(redis_our_port)" shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    wait_for eval "! pid_alive $pid" || { kill -KILL "$pid" 2>/dev/null || true; }
    rm -f "$REDIS_PIDFILE"
    say "redis: stopped ($(took "$t"))"
  else
    [[ -e $REDIS_PIDFILE ]] && rm -f "$REDIS_PIDFILE" && say "redis: removed stale pid file"
    say "redis: not running"
  fi
}

redis_status() {
  local pid
  if pid=$(redis_our_pid); then
    if redis_ping "$(redis_our_port)"; then say "redis: running on $HOST:$(redis_our_port) (ours, pid $pid)"
    else say "redis: ours (pid $pid) not answering on $(redis_our_port)"; return 1; fi
  elif command -v redis-cli >/dev/null && redis_ping "$REDIS_PORT"; then
    say "redis: running on $HOST:$REDIS_PORT (not ours)"
  else
    say "redis: stopped"; return 1
  fi
}

# ---------------------------------------------------------------- Kafka
kafka_libs_ok() { [[ -s $K_LIBS/.pom.sha256 && $(<"$K_LIBS/.pom.sha256") == "$(sha256sum <"$K_POM")" ]]; }

kafka_fetch_libs() { # the broker's jars from Maven Central, once (~/.m2 caches them too)
  kafka_libs_ok && return
  local t tmp="$K_LIBS.tmp"
  t=$(now_ms)
  mkdir -p "$K_LOGS" "$(dirname "$K_LIBS")"
  rm -rf "$tmp"
  mvn -B -q -ntp -Dstyle.color=never -f "$K_POM" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >"$K_LOGS/mvn.log" 2>&1 ||
    fail_with_log "kafka: mvn could not fetch the broker jars" "$K_LOGS/mvn.log"
  sha256sum <"$K_POM" >"$tmp/.pom.sha256"
  rm -rf "$K_LIBS"
  mv "$tmp" "$K_LIBS"
  say "kafka: fetched $(ls "$K_LIBS" | wc -l) jars ($(du -sh "$K_LIBS" | cut -f1)) from Maven Central ($(took "$t"))"
}

kafka_probe() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$HERE/create_topics.py" --probe --bootstrap "$HOST:$1" 2>/dev/null; }
kafka_our_pid() {
  local pid
  pid=$(read_pid "$K_PIDFILE")
  pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $K_CONF" && echo "$pid"
}
kafka_our_port() { sed -n 's/^listeners=PLAINTEXT:\/\/[^:]*:\([0-9]*\),.*/\1/p' "$K_CONF" 2>/dev/null || true; }
kafka_wait_ready() { # pid: port open, then a metadata request answers; fail early if the JVM dies
  local pid=$1 deadline=$(($(date +%s) + TIMEOUT))
  until port_open "$KAFKA_PORT" && kafka_probe "$KAFKA_PORT"; do
    pid_alive "$pid" || fail_with_log "kafka: the broker exited during start-up" "$K_LOGS/server.log" "$K_LOGS/stdout.log"
    (($(date +%s) < deadline)) || fail_with_log "kafka: not ready on $KAFKA_PORT within ${TIMEOUT}s" "$K_LOGS/server.log" "$K_LOGS/stdout.log"
    sleep 0.2
  done
}
kafka_topics() {
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$HERE/create_topics.py" --bootstrap "$HOST:$KAFKA_PORT" ||
    die "kafka: creating topics failed"
}

kafka_up() {
  local t pid conf cid
  t=$(now_ms)
  [[ -x $PY ]] || die "kafka: no $PY (run 'make venv', or set CITYPARK_PYTHON)"
  if pid=$(kafka_our_pid); then
    if [[ $(kafka_our_port) != "$KAFKA_PORT" ]]; then
      say "kafka: ours runs on port $(kafka_our_port), restarting on $KAFKA_PORT"
      kafka_down >/dev/null
    else
      kafka_wait_ready "$pid"
      say "kafka: reusing ours on $HOST:$KAFKA_PORT ($(took "$t"))"
      kafka_topics
      return
    fi
  fi
  [[ -e $K_PIDFILE ]] && say "kafka: removing stale $K_PIDFILE" && rm -f "$K_PIDFILE"
  if port_open "$KAFKA_PORT"; then
    kafka_probe "$KAFKA_PORT" ||
      die "kafka: port $KAFKA_PORT is held by something that does not answer a metadata request (set CITYPARK_KAFKA_PORT)"
    say "kafka: reusing the broker already on $HOST:$KAFKA_PORT (not ours; answers metadata)"
    kafka_topics
    return
  fi
  port_open "$KAFKA_CONTROLLER_PORT" &&
    die "kafka: controller port $KAFKA_CONTROLLER_PORT is in use (set CITYPARK_KAFKA_CONTROLLER_PORT)"
  kafka_fetch_libs
  mkdir -p "$K_LOGS"
  conf=$(<"$HERE/kafka/server.properties")
  conf=${conf//@LOG_DIRS@/$K_DATA}
  conf=${conf//@CONTROLLER_PORT@/$KAFKA_CONTROLLER_PORT}
  conf=${conf//@PORT@/$KAFKA_PORT}
  printf '%s\n' "$conf" >"$K_CONF"
  if [[ ! -s $K_DATA/meta.properties ]]; then
    rm -rf "$K_DATA"
    cid=$(java -Xmx128m -cp "$K_LIBS/*" kafka.tools.StorageTool random-uuid 2>"$K_LOGS/format.log") ||
      fail_with_log "kafka: StorageTool random-uuid failed" "$K_LOGS/format.log"
    java -Xmx256m -cp "$K_LIBS/*" kafka.tools.StorageTool format -t "$cid" -c "$K_CONF" >>"$K_LOGS/format.log" 2>&1 ||
      fail_with_log "kafka: formatting $K_DATA failed" "$K_LOGS/format.log"
    say "kafka: formatted $K_DATA (cluster $cid)"
  fi
  # setsid: its own session, so a Ctrl-C in the terminal that ran `make up` does not reach it
  setsid java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" \
    -Dkafka.logs.dir="$K_LOGS" -cp "$K_LIBS/*" kafka.Kafka "$K_CONF" \
    </dev/null >>"$K_LOGS/stdout.log" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$K_PIDFILE"
  kafka_wait_ready "$pid"
  say "kafka: started on $HOST:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT, pid $pid) ($(took "$t"))"
  kafka_topics
}

kafka_down() {
  local t pid
  t=$(now_ms)
  if pid=$(kafka_our_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    if ! TIMEOUT=30 wait_for eval "! pid_alive $pid"; then
      say "kafka: no exit 30 s after SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_for eval "! pid_alive $pid" || true
    fi
    rm -f "$K_PIDFILE"
    say "kafka: stopped ($(took "$t"))"
  else
    [[ -e $K_PIDFILE ]] && rm -f "$K_PIDFILE" && say "kafka: removed stale pid file"
    say "kafka: not running"
  fi
}

kafka_status() {
  local pid port
  if pid=$(kafka_our_pid); then
    port=$(kafka_our_port)
    if [[ -x $PY ]] && kafka_probe "$port"; then say "kafka: running on $HOST:$port (ours, pid $pid)"
    else say "kafka: ours (pid $pid) not answering on $port"; return 1; fi
  elif [[ -x $PY ]] && port_open "$KAFKA_PORT" && kafka_probe "$KAFKA_PORT"; then
    say "kafka: running on $HOST:$KAFKA_PORT (not ours)"
  else
    say "kafka: stopped"; return 1
  fi
}

# ---------------------------------------------------------------- main
lock() { # one infra.sh at a time per checkout (servers are started with 9>&-, not holding it)
  exec 9>"$LOCAL/.infra.lock"
  flock -w 300 9 || die "infra: another infra.sh holds $LOCAL/.infra.lock"
}

cmd=${1:-}
mkdir -p "$LOCAL"
case $cmd in
up)
  lock
  t0=$(now_ms)
  ensure_packages
  pg_up
  redis_up
  kafka_up
  say "infra: up ($(took "$t0"))"
  ;;
down)
  lock
  rc=0
  kafka_down || rc=1
  redis_down || rc=1
  pg_down || rc=1
  exit $rc
  ;;
status)
  rc=0
  pg_status || rc=1
  redis_status || rc=1
  kafka_status || rc=1
  exit $rc
  ;;
restart)
  lock
  down_s=${3:-0}
  [[ $down_s =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "restart: SECONDS must be a number, not '$down_s'"
  case ${2:-} in
  postgres) pg_down && sleep "$down_s" && pg_up ;;
  redis) redis_down && sleep "$down_s" && redis_up ;;
  kafka) kafka_down && sleep "$down_s" && kafka_up ;;
  *) die "usage: $0 restart postgres|redis|kafka [SECONDS]" ;;
  esac
  ;;
*)
  die "usage: $0 up|down|status|restart postgres|redis|kafka [SECONDS]"
  ;;
esac
