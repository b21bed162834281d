#!/usr/bin/env bash
# README command 2: the appliance against a real Mosquitto and a real InfluxDB, fed by the
# simulator, so that you can watch it work: start-up, calibration on the first seconds of a
# healthy bearing, scoring, then an outer-race fault growing until an alert is raised.
#
#   deploy/scripts/run-real.sh [--duration S] [--calibration-s S] [--fault outer|inner|ball|none]
#                              [--onset S] [--config PATH] [--keep-state]
#
# - Broker: the [mqtt] broker of the configuration (default deploy/pdm-edge.toml: 127.0.0.1:1883).
#   If nothing answers there (and it is a loopback address), a Mosquitto is started with the
#   settings of deploy/mosquitto.conf (persistence, queue bounds, packet size) except that it
#   listens on that loopback address without a password file or ACL, and keeps its
#   persistence file in var/run-real/mosquitto/.
# - InfluxDB: $INFLUX_URL (default http://127.0.0.1:8086). If nothing answers /ping there, an
#   influxd is started with deploy/influxdb.conf, its data in var/run-real/influxdb/ and
#   authentication off (loopback only). An existing server with authentication needs
#   PDM_EDGE__STORE__USERNAME / PDM_EDGE__STORE__PASSWORD (or __TOKEN) in the environment.
# - pdm-edge run with that configuration, the store switched to InfluxDB (database
#   $INFLUX_DB, default pdm_edge) and its state (spool, registry, labels) in var/run-real/
#   (emptied first unless --keep-state), calibration_s from --calibration-s (default 30 s);
#   /healthz and /metrics on a free loopback port (printed).
# - pdm-edge simulate on plant1/pump-07/de-accel (25.6 kHz, real time; fault from --onset,
#   default calibration + 45 s, growing over 60 s), and a watcher that prints every score,
#   alert and status change from MQTT.
#
# Ctrl-C (or the end of --duration) stops everything this script started, the appliance first
# (a clean stop: queued windows scored, spool flushed), and prints what reached InfluxDB.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

DURATION=0
CAL_S=30
FAULT=outer
ONSET=""
CONFIG=deploy/pdm-edge.toml
KEEP_STATE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --calibration-s) CAL_S="$2"; shift 2 ;;
        --fault) FAULT="$2"; shift 2 ;;
        --onset) ONSET="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --keep-state) KEEP_STATE=1; shift ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
ONSET="${ONSET:-$(python3 -c "print(float('$CAL_S') + 45)")}"

[ -x .venv/bin/pdm-edge ] || deploy/scripts/setup.sh
PY="$ROOT/.venv/bin/python"
PDM="$ROOT/.venv/bin/pdm-edge"
VAR="$ROOT/var/run-real"
mkdir -p "$VAR"
SITE=plant1 MACHINE=pump-07 SENSOR=de-accel

PIDS_STARTED=()      # what we started, stopped in reverse order
SVC_PID=""
MOSQ_PID=""
INFLUX_PID=""
say() { printf '\033[1m[run-real]\033[0m %s\n' "$*"; }

cleanup() {
    trap - INT TERM EXIT
    say "stopping ..."
    for pid in "${PIDS_STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -n "$SVC_PID" ] && kill -0 "$SVC_PID" 2>/dev/null; then
        kill -TERM "$SVC_PID" 2>/dev/null || true
        for _ in $(seq 1 700); do kill -0 "$SVC_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SVC_PID" 2>/dev/null && { say "pdm-edge did not stop within 70 s; killing it"; kill -KILL "$SVC_PID" 2>/dev/null || true; }
        wait "$SVC_PID" 2>/dev/null && say "pdm-edge stopped cleanly (exit 0)" || say "pdm-edge exit status $?"
        grep -o 'event=stopped .*' "$VAR/pdm-edge.log" | tail -1 | sed 's/^/    /' || true
    fi
    for pid in "${PIDS_STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "${INFLUX_URL:-}" ] && curl -sf -o /dev/null "$INFLUX_URL/ping"; then
        say "in InfluxDB $INFLUX_URL, database $INFLUX_DB:"
        for m in anomaly_score alert model_event; do
            n=$(curl -s -G "$INFLUX_URL/query" --data-urlencode "db=$INFLUX_DB" \
                --data-urlencode "q=SELECT count(*) FROM $m WHERE machine = '$MACHINE'" ${INFLUX_AUTH:-} |
                "$PY" -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; v=[x for s in r.get("series",[]) for x in s["values"]]; print(max((c for c in v[0][1:] if isinstance(c,int)), default=0) if v else 0)' 2>/dev/null || echo "?")
            echo "    $m: $n points (machine $MACHINE)"
        done
    fi
    if [ -n "$INFLUX_PID" ]; then kill -TERM "$INFLUX_PID" 2>/dev/null || true; wait "$INFLUX_PID" 2>/dev/null || true; say "influxd stopped"; fi
    if [ -n "$MOSQ_PID" ]; then kill -TERM "$MOSQ_PID" 2>/dev/null || true; wait "$MOSQ_PID" 2>/dev/null || true; say "mosquitto stopped"; fi
    say "logs: $VAR/pdm-edge.log, $VAR/simulate.log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { "$PY" -c "import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(s.connect_ex(('$1', int('$2'))))"; }
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# -- the broker ------------------------------------------------------------------------------
BROKER="${PDM_EDGE__MQTT__BROKER:-$("$PY" -c "from pdm_edge.config import load_config; print(load_config('$CONFIG').mqtt.broker)")}"
MQ_HOST="${BROKER%:*}" MQ_PORT="${BROKER##*:}"
if port_open "$MQ_HOST" "$MQ_PORT"; then
    say "using the MQTT broker already listening on $BROKER"
else
    case "$MQ_HOST" in 127.*|localhost|::1) ;; *) echo "no MQTT broker answers on $BROKER (not a local address: start it first)" >&2; exit 1 ;; esac
    MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    [ -x "$MOSQ" ] || { echo "mosquitto not installed (Debian: apt-get install mosquitto)" >&2; exit 1; }
    mkdir -p "$VAR/mosquitto"
    {
        echo "# generated by deploy/scripts/run-real.sh from deploy/mosquitto.conf: loopback, no password file/ACL"
        grep -vE '^\s*(#|$|listener|allow_anonymous|password_file|acl_file|persistence_location|log_dest|connection_messages|per_listener_settings)' deploy/mosquitto.conf
        echo "per_listener_settings false"
        echo "user $(id -un)"
        echo "listener $MQ_PORT $MQ_HOST"
        echo "allow_anonymous true"
        echo "persistence_location $VAR/mosquitto/"
        echo "log_dest file $VAR/mosquitto/mosquitto.log"
    } > "$VAR/mosquitto/mosquitto.conf"
    "$MOSQ" -c "$VAR/mosquitto/mosquitto.conf" &
    MOSQ_PID=$!
    for _ in $(seq 1 100); do port_open "$MQ_HOST" "$MQ_PORT" && break; kill -0 "$MOSQ_PID" 2>/dev/null || break; sleep 0.1; done
    port_open "$MQ_HOST" "$MQ_PORT" || { echo "mosquitto did not start (see $VAR/mosquitto/mosquitto.log)" >&2; exit 1; }
    say "mosquitto (pid $MOSQ_PID) on $BROKER, config $VAR/mosquitto/mosquitto.conf"
fi

# -- InfluxDB --------------------------------------------------------------------------------
INFLUX_URL="${INFLUX_URL:-http://127.0.0.1:8086}"
INFLUX_DB="${INFLUX_DB:-pdm_edge}"
INFLUX_AUTH=""
[ -n "${PDM_EDGE__STORE__USERNAME:-}" ] && INFLUX_AUTH="-u ${PDM_EDGE__STORE__USERNAME}:${PDM_EDGE__STORE__PASSWORD:-}"
if curl -sf -o /dev/null "$INFLUX_URL/ping"; then
    say "using the InfluxDB already answering at $INFLUX_URL"
else
    hostport="${INFLUX_URL#http://}"; hostport="${hostport%%/*}"
    case "$hostport" in 127.*|localhost*) ;; *) echo "no InfluxDB answers at $INFLUX_URL (not a local address: start it first)" >&2; exit 1 ;; esac
    INFLUXD="$(command -v influxd || echo /usr/bin/influxd)"
    [ -x "$INFLUXD" ] || { echo "influxd not installed (Debian: apt-get install influxdb)" >&2; exit 1; }
    mkdir -p "$VAR/influxdb"
    rpc="127.0.0.1:8088"; port_open 127.0.0.1 8088 && rpc="127.0.0.1:$(free_port)"
    sed -e "s#/var/lib/influxdb#$VAR/influxdb#g" \
        -e "s#^bind-address = .*#bind-address = \"$rpc\"#" \
        -e "s#^\(\s*\)bind-address = \"127.0.0.1:8086\"#\1bind-address = \"$hostport\"#" \
        -e "s#^\(\s*\)auth-enabled = true#\1auth-enabled = false#" deploy/influxdb.conf > "$VAR/influxdb/influxdb.conf"
    "$INFLUXD" -config "$VAR/influxdb/influxdb.conf" > "$VAR/influxdb/influxd.log" 2>&1 &
    INFLUX_PID=$!
    for _ in $(seq 1 300); do curl -sf -o /dev/null "$INFLUX_URL/ping" && break; kill -0 "$INFLUX_PID" 2>/dev/null || break; sleep 0.1; done
    curl -sf -o /dev/null "$INFLUX_URL/ping" || { echo "influxd did not start (see $VAR/influxdb/influxd.log)" >&2; exit 1; }
    say "influxd (pid $INFLUX_PID) at $INFLUX_URL, config $VAR/influxdb/influxdb.conf (auth off, loopback)"
fi

# -- the appliance ---------------------------------------------------------------------------
if [ "$KEEP_STATE" = 0 ]; then rm -rf "$VAR/state" "$VAR/registry" "$VAR/spool.sqlite"*; fi
export PDM_EDGE__MQTT__BROKER="$BROKER"
export PDM_EDGE__STORE__BACKEND=influxdb PDM_EDGE__STORE__URL="$INFLUX_URL" PDM_EDGE__STORE__DATABASE="$INFLUX_DB"
export PDM_EDGE__STATE_DIR="$VAR"
export PDM_EDGE__SPOOL__PATH="$VAR/spool.sqlite" PDM_EDGE__REGISTRY__DIR="$VAR/registry" PDM_EDGE__FEEDBACK__STATE_DIR="$VAR/state"
export PDM_EDGE__LEARNING__CALIBRATION_S="$CAL_S" PDM_EDGE__LEARNING__MAX_TRAIN_SECONDS="${MAX_TRAIN_S:-30}"
export PDM_EDGE__SERVICE__HTTP="127.0.0.1:0"
"$PDM" --config "$CONFIG" config check | sed 's/^/    /'
: > "$VAR/pdm-edge.log"
"$PDM" --config "$CONFIG" run >> "$VAR/pdm-edge.log" 2>&1 &
SVC_PID=$!
for _ in $(seq 1 600); do grep -q 'event=http_listening' "$VAR/pdm-edge.log" && break; kill -0 "$SVC_PID" 2>/dev/null || break; sleep 0.1; done
if ! grep -q 'event=http_listening' "$VAR/pdm-edge.log"; then
    tail -20 "$VAR/pdm-edge.log" >&2; echo "pdm-edge run did not start" >&2; exit 1
fi
HTTP="$(grep -o 'event=http_listening address=\S*' "$VAR/pdm-edge.log" | head -1 | sed 's/.*address=//')"
say "pdm-edge run (pid $SVC_PID): /healthz and /metrics on http://$HTTP, log $VAR/pdm-edge.log"
# the service's own events, as they happen
tail -n +1 -F "$VAR/pdm-edge.log" 2>/dev/null | grep --line-buffered -E \
    'event=(started|training_queued|calibrated|training_promoted|promoted|rejected|training_failed|alert_raised|alert_cleared|store_unreachable|store_reachable|stopped)|level=(error|warning)' |
    sed -u -e 's/^ts=\S* //' -e 's/^/  [pdm-edge] /' &
PIDS_STARTED+=($!)

# -- watcher: scores, alerts and status from MQTT ---------------------------------------------
"$PY" -u - "$BROKER" "$SITE" "$MACHINE" <<'EOF' &
import json, sys, time
import paho.mqtt.client as mqtt
broker, site, machine = sys.argv[1:4]
host, port = broker.rsplit(":", 1)
last_status = None
def on_connect(c, u, f, rc, p):
    c.subscribe([(f"pdm/v1/{site}/{machine}/+/score", 0), (f"pdm/v1/{site}/{machine}/alert", 1), (f"pdm/v1/{site}/{machine}/status", 1)])
def on_message(c, u, m):
    global last_status
    d = json.loads(m.payload)
    if m.topic.endswith("/score"):
        s, t = d["score"], d["threshold"]
        bar = "#" * max(0, min(40, int(round(10 * s / t)))) if t and s is not None and s > 0 else ""
        flag = "ABOVE" if d["is_anomaly"] else "ok"
        print(f"  [score]    {d['ts'][11:23]}  {m.topic.split('/')[4]:<9} {s:8.2f}  threshold {t:6.2f}  {flag:<5} {bar}")
    elif m.topic.endswith("/alert"):
        print(f"  [ALERT]    {d['state'].upper()} {d['sensor']} peak {d['peak_score']:.2f} > {d['threshold']:.2f} from {d['start'][11:19]} (id {d['id'][:8]})")
    else:
        key = (d.get("state"), d.get("stale"))
        if key != last_status:
            last_status = key
            print(f"  [status]   machine {site}/{machine}: {d.get('state')}{' (stale)' if d.get('stale') else ''}")
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"run-real-watch-{int(time.time())}")
c.on_connect, c.on_message = on_connect, on_message
c.connect(host, int(port))
c.loop_forever()
EOF
PIDS_STARTED+=($!)

# -- the sensor ------------------------------------------------------------------------------
SIM_DURATION=0
[ "$DURATION" != 0 ] && SIM_DURATION="$DURATION"
say "simulating $SITE/$MACHINE/$SENSOR at 25.6 kHz in real time, fault '$FAULT' from t = ${ONSET} s; calibration over the first ${CAL_S} s"
"$PDM" --config "$CONFIG" simulate --site "$SITE" --machine "$MACHINE" --sensor "$SENSOR" --fault "$FAULT" \
    --onset "$ONSET" --growth 60 --shaft-hz 29.95 --duration "$SIM_DURATION" > "$VAR/simulate.log" 2>&1 &
SIM_PID=$!
PIDS_STARTED=("$SIM_PID" "${PIDS_STARTED[@]}")
if [ "$DURATION" != 0 ]; then
    say "running for $DURATION s (Ctrl-C stops earlier)"
    wait "$SIM_PID" || true
    sleep 3  # the last windows through the pipeline
else
    say "Ctrl-C stops everything"
    wait "$SIM_PID" || true
fi
