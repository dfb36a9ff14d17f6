#!/usr/bin/env bash
# Make TLS certificates and SuperNode auth keys for a SA-FedLoRA federation.
#
#   scripts/make-certs.sh OUT_DIR [HOST ...]      (env NUM_NODES=2, DAYS=365)
#
# Needs bash, OpenSSL >= 1.1.1 (for -addext) and ssh-keygen.
#
# OUT_DIR/ca.crt, ca.key           self-signed CA (trust anchor for SuperNodes, SuperExecs, flwr CLI)
# OUT_DIR/server.pem, server.key   SuperLink certificate signed by the CA; SANs: localhost,
#                                  127.0.0.1, ::1, superlink (compose service) + every HOST
#                                  (IPs become IP SANs, anything else DNS SANs)
# OUT_DIR/node-K, node-K.pub       OpenSSH ECDSA P-384 key pair of SuperNode K (K = 0..NUM_NODES-1,
#                                  the same K as its partition-id and compose service supernode-K),
#                                  register the .pub with `flwr supernode register`
#
# Idempotent: an existing CA and existing node keys are kept (re-creating them would invalidate
# distributed ca.crt copies and node registrations); the server certificate is re-issued on
# every call so that a changed HOST list takes effect. Never prompts.
#
# Permissions: certificates and public keys 0644; private keys 0600 (owned by the caller).
# The flwr images run as uid 49999: a bind-mounted 0600 key owned by another uid is unreadable
# in the container. Set CONTAINER_UID=49999 (needs root) to chown the keys containers read.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 OUT_DIR [HOST ...]   (env: NUM_NODES=2 DAYS=365 CONTAINER_UID=)" >&2
  exit 2
fi
out="$1"; shift
num_nodes="${NUM_NODES:-2}"
days="${DAYS:-365}"
[[ "$num_nodes" =~ ^[0-9]+$ ]] || { echo "NUM_NODES must be a number" >&2; exit 2; }
mkdir -p "$out"
cd "$out"
umask 077  # private keys are born 0600; public files are chmod'ed below

# openssl chatters on stderr: show its output only when it fails.
quiet() { local log; if ! log=$("$@" 2>&1); then echo "$log" >&2; echo "failed: $*" >&2; exit 1; fi; }

# --- CA (kept if present) ---
if [[ ! -s ca.key || ! -s ca.crt ]]; then
  quiet openssl req -x509 -new -nodes -newkey rsa:3072 -sha256 -days "$days" \
    -keyout ca.key -out ca.crt -subj "/CN=SA-FedLoRA CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

# --- SuperLink server certificate (re-issued every call) ---
sans="DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1,DNS:superlink"
for h in "$@"; do
  if [[ "$h" =~ ^[0-9]+(\.[0-9]+){3}$ || "$h" == *:* ]]; then sans+=",IP:$h"; else sans+=",DNS:$h"; fi
done
cat > server.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
[[ -s server.key ]] || quiet openssl genrsa -out server.key 3072
quiet openssl req -new -key server.key -out server.csr -subj "/CN=superlink"
quiet openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out server.pem -days "$days" -sha256 -extfile server.ext
rm -f server.csr server.ext ca.srl

# --- SuperNode authentication keys (kept if present) ---
for ((k = 0; k < num_nodes; k++)); do
  [[ -s "node-$k" ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$k" -f "node-$k"
done

chmod 0644 ca.crt server.pem node-*.pub 2>/dev/null || true
chmod 0600 ca.key server.key
for ((k = 0; k < num_nodes; k++)); do chmod 0600 "node-$k"; done
if [[ -n "${CONTAINER_UID:-}" ]]; then
  # Containers read server.key (superlink) and node-K (supernodes); ca.key stays the caller's.
  chown "$CONTAINER_UID" server.key node-*
fi
echo "$(pwd): ca.crt, server.pem (+ .key) and node-K[.pub] for K < $num_nodes"
