# Shared by scripts/test and scripts/quickstart: install what is missing.

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

ensure_system_packages() {
  have serf || need_apt+=(serf)
  have git || need_apt+=(git)
  have iptables || need_apt+=(iptables)
  have ip || need_apt+=(iproute2)
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
