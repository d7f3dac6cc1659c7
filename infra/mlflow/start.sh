#!/bin/sh
# Start the MLflow tracking server the way infra runs it: Postgres backend, S3 artifacts proxied by the
# server (clients need no S3 credentials), the basic-auth app with its user table in Postgres too.
# Everything comes from the environment (see infra/.env.example); compose, k8s and tests/infra use this.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?postgresql://user:pass@host:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?postgresql://user:pass@host:5432/mlflow_auth}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?s3://bucket/prefix}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?the admin password set on first start}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?a random string shared by every MLflow server replica}"
# The auth app reads its database from an ini file only; write it from the environment.
AUTH_INI="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow_basic_auth.ini}"
cat > "$AUTH_INI" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
# No job-runner workers (~8 processes, ~2.3 GB) and no telemetry (TRAPS.md).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
exec mlflow server --app-name basic-auth \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"}
