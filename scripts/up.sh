#!/usr/bin/env bash
# `make up`: the Airflow UI (airflow standalone: api-server, scheduler, dag-processor, triggerer) on :8080 and the
# MLflow UI on :5000, over the stores `make run` writes, in the background. Pid files and logs go to
# <FASHION_TAGGER_HOME>/services; `make down` (scripts/down.sh) stops both. Both services run in the home, so
# nothing they write lands in the checkout. Set FASHION_TAGGER_HOME, AIRFLOW_UI_PORT and MLFLOW_UI_PORT to serve
# another home on other ports (tests/test_browser.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="${VENV_BIN:-$PWD/.venv/bin}"
export PATH="$VENV_BIN:$PATH"  # standalone starts its components as `airflow <component>`
# The form's preset defaults to demo here: this machine trains on CPU. Production sets FASHION_TAGGER_PRESET=default.
export FASHION_TAGGER_PRESET="${FASHION_TAGGER_PRESET:-demo}"
# The DAG is created active and, here, runs only when triggered (FASHION_TAGGER_SCHEDULE=none, see
# scripts/airflow_env.py): a run triggered from the form starts at once. Unpausing a DAG with a schedule would also
# start the run of its latest interval (catchup=False still runs the most recent one), and the form's run would
# wait behind it (max_active_runs=1). Production keeps Airflow's paused-on-creation and the weekly schedule.
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}"
eval "$(python scripts/airflow_env.py --shell --port "${AIRFLOW_UI_PORT:-8080}")"
MLFLOW_PORT="${MLFLOW_UI_PORT:-5000}"
SERVICES="$FASHION_TAGGER_HOME/services"
mkdir -p "$SERVICES" "$AIRFLOW_HOME" "$FASHION_TAGGER_HOME/mlartifacts"

running() { [[ -f "$SERVICES/$1.pid" ]] && kill -0 "$(cat "$SERVICES/$1.pid")" 2>/dev/null; }

start() {  # name, command...: its own session, so `make down` can stop it with everything it started
  local name="$1"; shift
  if running "$name"; then
    echo "$name is already running (pid $(cat "$SERVICES/$name.pid"))"
    return
  fi
  # In the home: MLflow's default artifact root and anything else a service writes relative to its working
  # directory stay out of the checkout.
  (cd "$FASHION_TAGGER_HOME" && exec setsid "$@" >"$SERVICES/$name.log" 2>&1 </dev/null) &
  echo $! >"$SERVICES/$name.pid"
}

wait_http() {  # name, url, seconds
  local deadline=$((SECONDS + $3))
  until curl -fsS -o /dev/null "$2" 2>/dev/null; do
    if ! running "$1"; then
      echo "$1 exited; the end of $SERVICES/$1.log:" >&2
      tail -n 30 "$SERVICES/$1.log" >&2
      exit 1
    fi
    if ((SECONDS > deadline)); then
      echo "$1 is not answering on $2 after $3 s; see $SERVICES/$1.log" >&2
      exit 1
    fi
    sleep 2
  done
}

if ! running airflow; then
  echo "airflow: preparing $AIRFLOW_HOME (metadata database, pool '${FASHION_TAGGER_GPU_POOL:-gpu}')"
  airflow db migrate >"$SERVICES/airflow-init.log" 2>&1
  airflow pools set "${FASHION_TAGGER_GPU_POOL:-gpu}" "${GPU_POOL_SLOTS:-1}" "GPU slots: one per GPU" \
    >>"$SERVICES/airflow-init.log" 2>&1
fi
start airflow airflow standalone
# --default-artifact-root: where experiments created without an artifact location keep their artifacts (MLflow's
# `Default` among them), a plain path so that clients of the SQLite store can write there too.
start mlflow mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --default-artifact-root "$FASHION_TAGGER_HOME/mlartifacts" \
  --artifacts-destination "$FASHION_TAGGER_HOME/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT"

wait_http mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 120
wait_http airflow "$AIRFLOW__API__BASE_URL/api/v2/monitor/health" 180

PASSWORDS="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
cat <<MSG

Airflow  $AIRFLOW__API__BASE_URL   DAG fashion_tagger_training (trigger it with the form: "Trigger" > parameters)
         user admin; its password is in $PASSWORDS
MLflow   http://127.0.0.1:$MLFLOW_PORT   registered model fashion-tagger, alias champion
logs     $SERVICES/{airflow,mlflow}.log
stop     make down
MSG
