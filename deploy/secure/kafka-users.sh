#!/bin/sh
# Gives each edow principal its SCRAM-SHA-512 credential and the ACLs of docs/security.md ("ACLs per principal"),
# through the broker's loopback listener (plaintext, reachable only inside the broker's network namespace, which
# this one-shot service shares; its anonymous principal is the super user). Idempotent: a rerun sets the same.
set -eu
bin=/opt/kafka/bin
boot=localhost:29094
password() { sed -n 's/^sasl\.password=//p' "/run/secrets/kafka-$1.properties"; }
for who in orchestrator worker cli registry; do
  "$bin/kafka-configs.sh" --bootstrap-server "$boot" --alter --entity-type users --entity-name "edow-$who" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$(password "$who")]" >/dev/null
done
acl() { "$bin/kafka-acls.sh" --bootstrap-server "$boot" --add --force "$@" >/dev/null; }
prefixed="--resource-pattern-type prefixed"
# The orchestrator reads and writes every edow topic and creates them at start; it reads in its own groups.
acl --allow-principal User:edow-orchestrator $prefixed --topic edow. \
  --operation Read --operation Write --operation Create --operation Describe --operation DescribeConfigs
acl --allow-principal User:edow-orchestrator $prefixed --group edow- --operation Read
# Workers read their tasks (and write retries and dead letters) and write results; nothing else.
acl --allow-principal User:edow-worker $prefixed --topic edow.tasks. \
  --operation Read --operation Write --operation Describe
acl --allow-principal User:edow-worker --topic edow.results --operation Write --operation Describe
acl --allow-principal User:edow-worker --group edow-workers --operation Read
# The CLI is the operator's tool: it deploys, starts, signals, replays and reads state.
acl --allow-principal User:edow-cli $prefixed --topic edow. --operation Read --operation Write --operation Describe
acl --allow-principal User:edow-cli $prefixed --group edow- --operation Read
# The registry keeps its schemas topic.
acl --allow-principal User:edow-registry --topic _schemas \
  --operation Read --operation Write --operation Create --operation Describe --operation DescribeConfigs
acl --allow-principal User:edow-registry $prefixed --group edow-registry --operation Read
echo "SCRAM users and ACLs are in place"
