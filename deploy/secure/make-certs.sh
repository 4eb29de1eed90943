#!/bin/sh
# The secured docker-compose stack's CA and certificates, made once into /certs (the `certs` volume) and kept
# across restarts. Dev only: the CA's key stays in the volume. For anything shared, issue these from your own
# PKI and mount them instead of running this.
set -eu
cd "${CERTS_DIR:-/certs}"
if [ -f ca.pem ]; then
  echo "the certificates exist already"
  exit 0
fi
command -v openssl >/dev/null || apk add --no-cache openssl >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=edow compose CA" \
  -keyout ca-key.pem -out ca.pem 2>/dev/null

# issue NAME SUBJECT SUBJECT-ALT-NAMES
issue() {
  openssl req -new -newkey rsa:2048 -nodes -subj "$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm "$1.csr" "$1.ext"
}
issue kafka /CN=kafka DNS:kafka,DNS:localhost
# Kafka's PEM keystore is one file: the private key, then its certificate chain.
cat kafka-key.pem kafka.pem > kafka-keystore.pem
issue schema-registry /CN=schema-registry DNS:schema-registry,DNS:localhost
issue orchestrator /CN=orchestrator DNS:orchestrator,DNS:localhost
# A client certificate for the API, for when the orchestrator requires them (EDOW_HTTP_TLS_CLIENT_CA).
issue operator-client "/CN=dev-operator/O=operator" DNS:localhost
# The services run as different users (Kafka as 1000, edow as 65532) and read these from a volume of this
# stack's own; only the CA's key stays private to root.
chmod 0644 ./*.pem
chmod 0600 ca-key.pem
echo "made the CA and certificates in /certs"
