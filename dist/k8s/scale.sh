#!/bin/sh
# scale.sh DEPLOYMENT REPLICAS: a hook that scales the app through the API
# server with the pod's ServiceAccount. Scaling to 0 waits (up to
# UNDERSTUDY_SCALE_WAIT seconds, 120 by default) until none of the
# Deployment's pods is left, terminating ones included: the final cut must
# not race the app's last writes.
set -eu
dep=$1
replicas=$2
sa=/var/run/secrets/kubernetes.io/serviceaccount
ns=$(cat "$sa/namespace")
api="https://${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT}"
call() {
  curl -fsS --cacert "$sa/ca.crt" -H "Authorization: Bearer $(cat "$sa/token")" "$@"
}
call -X PATCH -H 'Content-Type: application/merge-patch+json' \
  -d "{\"spec\":{\"replicas\":$replicas}}" \
  "$api/apis/apps/v1/namespaces/$ns/deployments/$dep/scale" >/dev/null
[ "$replicas" = 0 ] || exit 0
i=0
while [ "$i" -lt "${UNDERSTUDY_SCALE_WAIT:-120}" ]; do
  if call "$api/api/v1/namespaces/$ns/pods?labelSelector=app%3D$dep" \
      | jq -e '.items | length == 0' >/dev/null; then
    exit 0
  fi
  sleep 1
  i=$((i + 1))
done
echo "scale.sh: $dep still has pods after ${UNDERSTUDY_SCALE_WAIT:-120} s" >&2
exit 1
