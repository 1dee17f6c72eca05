# Shared by scripts/test and scripts/quickstart: install what is missing.

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

ensure_system_packages() {
  have serf || need_apt+=(serf)
  have etcd || need_apt+=(etcd-server)
  have git || need_apt+=(git)
  have curl || need_apt+=(curl)
  have iptables || need_apt+=(iptables)
  have ip || need_apt+=(iproute2)
  dpkg-query -W busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)  # image tests: a static busybox root filesystem
  if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing: ${need_apt[*]} (install them, or run as root to have them installed)" >&2
      exit 2
    fi
    echo "== installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
}

ensure_venv() {
  local py=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$py" -m venv .venv
  fi
  # Reinstall only when pyproject.toml changed since the last install.
  local stamp=.venv/.flynnp2p-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing flynnp2p and its test extras into .venv"
    local log=.venv/install.log
    if ! { .venv/bin/python -m pip install -q --disable-pip-version-check -U pip &&
           .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'; } >"$log" 2>&1; then
      cat "$log" >&2
      echo "installing into .venv failed (log above, also in $log)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}

# A Docker engine for the docker backend's tests. Installs docker.io (as root) when
# dockerd is missing; when no engine answers, starts `dockerd --storage-driver=vfs`
# in the background (pid and log in a temp dir) and waits, bounded, until
# `docker info` works. DOCKERD_PID is set only when this shell started dockerd;
# stop_dockerd stops exactly that process. Returns 1 (with a message) when no
# engine can be had, e.g. not root and none running.
DOCKERD_PID=
DOCKERD_DIR=
ensure_docker() {
  if docker info >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "no Docker engine reachable and not root: cannot install or start dockerd" >&2
    return 1
  fi
  if ! have dockerd || ! have docker; then
    echo "== installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq docker.io >/dev/null
  fi
  DOCKERD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/flynnp2p-dockerd.XXXXXX")
  echo "== starting dockerd (log: $DOCKERD_DIR/dockerd.log)"
  # In its own session, so a ^C at the terminal reaches pytest (which then cleans up
  # its containers) and not dockerd; the caller stops dockerd afterwards.
  setsid dockerd --storage-driver=vfs --pidfile "$DOCKERD_DIR/dockerd.pid" \
    >"$DOCKERD_DIR/dockerd.log" 2>&1 </dev/null &
  DOCKERD_PID=$!
  echo "$DOCKERD_PID" >"$DOCKERD_DIR/pid"
  local i
  for i in $(seq 1 120); do  # up to 60 s
    if docker info >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      tail -n 20 "$DOCKERD_DIR/dockerd.log" >&2
      echo "dockerd exited while starting (log above, also in $DOCKERD_DIR/dockerd.log)" >&2
      DOCKERD_PID=
      return 1
    fi
    sleep 0.5
  done
  tail -n 20 "$DOCKERD_DIR/dockerd.log" >&2
  echo "dockerd did not answer within 60 s (log in $DOCKERD_DIR/dockerd.log)" >&2
  stop_dockerd
  return 1
}

# Stop the dockerd that ensure_docker started (none otherwise): SIGTERM, then up to
# 30 s for it to stop its containers and exit, then SIGKILL. Safe to call twice.
stop_dockerd() {
  local pid=$DOCKERD_PID i
  DOCKERD_PID=
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "dockerd did not stop within 30 s of SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  # Its pid file and log go too (they are kept only while it runs, for diagnosis).
  [ -n "$DOCKERD_DIR" ] && rm -rf "$DOCKERD_DIR"
  DOCKERD_DIR=
}
