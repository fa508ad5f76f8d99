#!/usr/bin/env bash
# Per-node and per-DPU identities for host-agent (xpu://host/<node>) and dpu-agent
# (xpu://dpu/<serial>).
#
# A DaemonSet's pods share one template, so they cannot each name "their" Secret: every node needs
# its own certificate, provisioned on the node itself (like the kubelet's own client certificate)
# and mounted read-only from /etc/xpu/host/ (tenant nodes) or /etc/xpu/dpu/ (DPUs). This script
# makes those directories from an inventory; your node provisioning (Ignition, cloud-init, Ansible,
# …) installs each one on its machine. Re-run it before the certificates expire and restart the
# agents (they read their certificate at start).
#
# Usage:
#   node-identities.sh ca --ca-dir DIR --inventory FILE --out DIR [--days 90] [--xpu-broker BIN]
#       Signs with `xpu-broker ca issue` and the CA in DIR (ca.crt, ca.key), e.g. the one made by
#       `xpu-broker ca init`. The CA key never leaves the machine this runs on.
#   node-identities.sh cert-manager --inventory FILE --out DIR [--namespace xpu-pki]
#       [--issuer xpu-ca] [--duration 2160h] [--renew-before 720h] [--timeout 120s]
#       Creates one cert-manager Certificate per node/DPU (signed by the Issuer, which must use the
#       xpu CA), waits for it, and exports its Secret. cert-manager renews the Secrets; re-run the
#       script (e.g. daily from cron) to export the renewed ones.
#
# Inventory, one machine per line (# starts a comment):
#   host <tenant-node-name> <serial of the DPU in that host>
#   dpu  <dpu-serial> [<tenant-node-name of its host>]
#
# Output:
#   OUT/host/<node>/   tls.crt tls.key ca.crt dpu-serial     → install as /etc/xpu/host/
#   OUT/dpu/<serial>/  tls.crt tls.key ca.crt serial [tenant-node] → install as /etc/xpu/dpu/
# Directories 0700, keys 0600: install them owned by root, mode unchanged.
set -euo pipefail

die() { echo "node-identities.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2; exit 2; }

[ $# -ge 1 ] || usage
mode=$1; shift
ca_dir="" inventory="" out="" days=90 xpu_broker=xpu-broker
namespace=xpu-pki issuer=xpu-ca duration=2160h renew_before=720h timeout=120s
while [ $# -gt 0 ]; do
  case $1 in
    --ca-dir) ca_dir=$2; shift 2 ;;
    --inventory) inventory=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --xpu-broker) xpu_broker=$2; shift 2 ;;
    --namespace) namespace=$2; shift 2 ;;
    --issuer) issuer=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --renew-before) renew_before=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown argument $1" ;;
  esac
done
[ -n "$inventory" ] && [ -r "$inventory" ] || die "--inventory FILE is required and must be readable"
[ -n "$out" ] || die "--out DIR is required"
case $mode in
  ca) [ -r "$ca_dir/ca.crt" ] && [ -r "$ca_dir/ca.key" ] || die "--ca-dir must hold ca.crt and ca.key" ;;
  cert-manager) command -v kubectl >/dev/null || die "kubectl is required" ;;
  *) usage ;;
esac

# The broker's rules (broker/src/identity.rs): a DPU serial is a DNS-1123 label, a node name a
# DNS-1123 subdomain.
label_re='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
subdomain_re='^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'

umask 077
mkdir -p "$out/host" "$out/dpu"

# issue <kind> <name> <dir>: tls.crt, tls.key, ca.crt for xpu://<kind>/<name> into <dir>.
issue() {
  local kind=$1 name=$2 dir=$3
  mkdir -p "$dir"
  case $mode in
    ca)
      "$xpu_broker" ca issue --dir "$ca_dir" --identity "$kind/$name" --out "$dir" --days "$days" >/dev/null
      ;;
    cert-manager)
      local cert="xpu-$kind-$name"
      kubectl apply -f - >/dev/null <<YAML
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: $cert
  namespace: $namespace
  labels:
    app.kubernetes.io/part-of: xpu-broker
    xpu.opi.dev/identity-kind: $kind
spec:
  secretName: $cert
  issuerRef: {group: cert-manager.io, kind: Issuer, name: $issuer}
  duration: $duration
  renewBefore: $renew_before
  privateKey: {algorithm: ECDSA, size: 256, encoding: PKCS8, rotationPolicy: Always}
  usages: [client auth, digital signature]
  uris: [xpu://$kind/$name]
YAML
      kubectl -n "$namespace" wait --for=condition=Ready "certificate/$cert" --timeout="$timeout" >/dev/null \
        || die "certificate $namespace/$cert did not become Ready"
      local key
      for key in tls.crt tls.key ca.crt; do
        kubectl -n "$namespace" get secret "$cert" -o "jsonpath={.data.${key//./\\.}}" | base64 -d > "$dir/$key.new"
        [ -s "$dir/$key.new" ] || die "secret $namespace/$cert has no $key"
        mv -f "$dir/$key.new" "$dir/$key"
      done
      ;;
  esac
  chmod 0600 "$dir"/tls.key
}

n=0
while read -r kind a b c || [ -n "${kind:-}" ]; do
  case ${kind:-} in ''|'#'*) continue ;; esac
  case $kind in
    host)
      [[ ${a:-} =~ $subdomain_re ]] || die "host ${a:-?}: the node name must be a DNS-1123 subdomain"
      [[ ${b:-} =~ $label_re ]] || die "host $a: the DPU serial ${b:-?} must be a DNS-1123 label"
      issue host "$a" "$out/host/$a"
      printf '%s\n' "$b" > "$out/host/$a/dpu-serial"
      ;;
    dpu)
      [[ ${a:-} =~ $label_re ]] || die "dpu ${a:-?}: the serial must be a DNS-1123 label"
      issue dpu "$a" "$out/dpu/$a"
      printf '%s\n' "$a" > "$out/dpu/$a/serial"
      if [ -n "${b:-}" ]; then printf '%s\n' "$b" > "$out/dpu/$a/tenant-node"; fi
      ;;
    *) die "inventory: unknown entry kind $kind (host or dpu)" ;;
  esac
  n=$((n + 1))
  echo "node-identities.sh: $kind $a → $out/$kind/$a" >&2
done < "$inventory"
[ "$n" -gt 0 ] || die "the inventory lists no machine"
