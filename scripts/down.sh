#!/usr/bin/env bash
# `make down`: stop what `make up` started. Each service was started in a session of its own (pid files in
# <home>/services); every process of that session is stopped, including task runners in groups of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="${VENV_BIN:-$PWD/.venv/bin}"
SERVICES="$("$VENV_BIN/python" -c 'from fashion_tagger.core.config import project_home; print(project_home().root)')/services"

members() {  # the processes of session $1
  ps -e -o pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }'
}

stop() {
  local name="$1" pid_file="$SERVICES/$1.pid"
  if [[ ! -f "$pid_file" ]]; then
    echo "$name: not started by make up"
    return
  fi
  local sid
  sid="$(cat "$pid_file")"
  if [[ -z "$(members "$sid")" ]]; then
    echo "$name: was not running"
  else
    # shellcheck disable=SC2046  # one pid per word
    kill -TERM $(members "$sid") 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z "$(members "$sid")" ]] && break
      sleep 1
    done
    # shellcheck disable=SC2046
    [[ -n "$(members "$sid")" ]] && kill -KILL $(members "$sid") 2>/dev/null || true
    echo "$name: stopped (session $sid)"
  fi
  rm -f "$pid_file"
}

stop airflow
stop mlflow
