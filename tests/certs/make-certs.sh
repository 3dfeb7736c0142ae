#!/bin/sh
# Regenerate the test certificates in this directory (run: make certs).
#
#   ca.pem, ca.key                self-signed test CA
#   server.pem, server.key        RSA 2048, signed by the CA
#   server-ec.pem, server-ec.key  ECDSA P-256, signed by the CA
#   dhparams.pem                  2048-bit DH parameters (takes a minute)
#
# Server certificates: CN=localhost, subjectAltName DNS:localhost,
# IP:127.0.0.1, IP:::1. Valid from 2000-01-01 until 36500 days from now.
set -eu
cd "$(dirname "$0")"

DAYS=36500
START=20000101000000Z
CNF=openssl.cnf

# Scratch state for `openssl ca` (its database and its copies of the certs).
CA_DIR=$(mktemp -d)
export CA_DIR
trap 'rm -rf "$CA_DIR"' EXIT
: >"$CA_DIR/index.txt"

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
openssl req -new -config "$CNF" -key ca.key -subj "/CN=blackhole.py test CA" \
    -out "$CA_DIR/ca.csr"
openssl ca -batch -notext -config "$CNF" -selfsign -keyfile ca.key \
    -startdate "$START" -days "$DAYS" -extensions ca_ext \
    -in "$CA_DIR/ca.csr" -out ca.pem

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key
openssl req -new -config "$CNF" -key server.key -subj "/CN=localhost" \
    -out "$CA_DIR/server.csr"
openssl ca -batch -notext -config "$CNF" -cert ca.pem -keyfile ca.key \
    -startdate "$START" -days "$DAYS" -extensions server_rsa_ext \
    -in "$CA_DIR/server.csr" -out server.pem

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -pkeyopt ec_param_enc:named_curve -out server-ec.key
openssl req -new -config "$CNF" -key server-ec.key -subj "/CN=localhost" \
    -out "$CA_DIR/server-ec.csr"
openssl ca -batch -notext -config "$CNF" -cert ca.pem -keyfile ca.key \
    -startdate "$START" -days "$DAYS" -extensions server_ec_ext \
    -in "$CA_DIR/server-ec.csr" -out server-ec.pem

# server.key under a pass phrase: blackhole must refuse it, not prompt
openssl pkey -in server.key -aes256 -passout pass:secret -out server-encrypted.key

# Test keys, committed on purpose: readable like every other file.
chmod 644 ca.key server.key server-ec.key server-encrypted.key

openssl dhparam -out dhparams.pem 2048 2>/dev/null

openssl verify -x509_strict -CAfile ca.pem server.pem server-ec.pem
