#!/usr/bin/env bash
# Creates the dev kind cluster "dlstack" with a local image registry on localhost:5001
# (kind's documented local-registry pattern). Idempotent: re-running keeps what exists.
# Needs docker, kind and kubectl. Then: `make up ENV=dev` (or `make render ENV=dev` offline).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLUSTER="${KIND_CLUSTER_NAME:-dlstack}"
REG_NAME="kind-registry"
REG_PORT="5001"
REG_IMAGE="registry:2"

for tool in docker kind kubectl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "create-cluster: $tool is not installed; install it (https://kind.sigs.k8s.io/docs/user/quick-start/)" >&2
    echo "create-cluster: without a cluster, \`make render ENV=dev\` shows what would be deployed" >&2
    exit 2
  fi
done

# 1. The registry container, published on the host's loopback only.
if [ "$(docker inspect -f '{{.State.Running}}' "$REG_NAME" 2>/dev/null || true)" != "true" ]; then
  docker run -d --restart=always -p "127.0.0.1:${REG_PORT}:5000" --network bridge --name "$REG_NAME" "$REG_IMAGE"
fi

# 2. The cluster, from the kept config (containerd reads registry hosts from /etc/containerd/certs.d).
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml"
fi

# 3. Every node resolves localhost:5001 to the registry container.
REGISTRY_DIR="/etc/containerd/certs.d/localhost:${REG_PORT}"
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" mkdir -p "$REGISTRY_DIR"
  printf '[host."http://%s:5000"]\n' "$REG_NAME" | docker exec -i "$node" cp /dev/stdin "$REGISTRY_DIR/hosts.toml"
done

# 4. The registry joins the cluster's network (once).
if [ "$(docker inspect -f '{{json .NetworkSettings.Networks.kind}}' "$REG_NAME")" = "null" ]; then
  docker network connect kind "$REG_NAME"
fi

# 5. Document the registry for tools (KEP-1755 "local-registry-hosting").
kubectl --context "kind-${CLUSTER}" apply -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: local-registry-hosting
  namespace: kube-public
data:
  localRegistryHosting.v1: |
    host: "localhost:${REG_PORT}"
    help: "https://kind.sigs.k8s.io/docs/user/local-registry/"
YAML

echo "create-cluster: kind-${CLUSTER} is ready; images go to localhost:${REG_PORT}"
